"""extract: one dump file -> articles JSONL.gz (id, title, url, text), via WikiExtractor.

WikiExtractor does the wikitext-to-plain-text work; this step wraps it in the checks it
lacks. It exits 0 with no output on a dump without `<siteinfo>`, on a file that is not XML
at all, and on UTF-16 text, so those are recognised up front from the first bytes; a
truncated .bz2 makes it die with a traceback, which is turned into one clear line. It
also leaves HTML entities (`&amp;`, `&lt;`, some double-escaped) in titles and text: they
are unescaped here. Redirects never reach the output (WikiExtractor skips them) and empty
articles are dropped.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import html
import io
import json
import logging
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from bertdistill import children
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.progress import Progress
from bertdistill.store import open_folder, split_uri

ARTICLES_PER_PART = 50_000
_LONE_TAG = re.compile(r"^\s*</?[A-Za-z][^<>]*>\s*$")  # <onlyinclude> and friends WikiExtractor leaves
HEAD_BYTES = 1 << 16
log = logging.getLogger(__name__)


@dataclass
class ExtractParams:
    input: str = flag(help="dump file URI (.xml, .xml.bz2)")
    output: str = flag(help="articles folder URI (part-NNNNN.jsonl.gz)")
    processes: int = flag(0, help="WikiExtractor processes (0: one per available core)")
    force: bool = False


def run(params: ExtractParams) -> Manifest:
    folder, name = split_uri(params.input)
    output = open_folder(params.output)

    def work(writer: OutputWriter) -> dict:
        with folder.local_copy(name) as path:
            check_dump_head(path, params.input)
            return _extract(path, params, writer)

    return run_step("extract", {"schema": 1}, {"dump": params.input}, output, work, force=params.force)


def _open_any(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def check_dump_head(path: Path, uri: str) -> None:
    """Refuse, from the first bytes, the inputs WikiExtractor would silently turn into nothing."""
    try:
        with _open_any(path) as f:
            head = f.read(HEAD_BYTES)
    except (OSError, EOFError) as exc:
        raise StepError(f"{uri}: cannot decompress ({exc}); the file is corrupt or not {path.suffix}: "
                        "download it again") from None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[:200].count(b"\x00") > 20:
        raise StepError(f"{uri}: the dump is UTF-16; MediaWiki XML dumps are UTF-8: re-export or "
                        "convert it (iconv -f UTF-16 -t UTF-8)")
    text = head.decode("utf-8", "replace").lstrip("\ufeff \r\n\t")
    if text.startswith("<?xml"):
        text = text[text.find("?>") + 2 :].lstrip()
    if not text.startswith("<mediawiki"):
        raise StepError(f"{uri}: not a MediaWiki XML dump (it does not start with <mediawiki>): "
                        "pass a pages-articles .xml or .xml.bz2 file")
    if "<siteinfo>" not in text:
        raise StepError(f"{uri}: the dump has no <siteinfo> header, without which WikiExtractor yields "
                        "no articles; use an unmodified pages-articles dump")


def _extract(path: Path, params: ExtractParams, writer: OutputWriter) -> dict:
    processes = params.processes or len(os.sched_getaffinity(0))
    # Through bertdistill.children: WikiExtractor and the workers it forks die with this step, even SIGKILLed.
    command = children.module_command("wikiextractor.WikiExtractor", "--json", "--no-templates",
                                      "--processes", str(processes), "-q", "-o", "-", str(path))
    log.info("extract: running WikiExtractor on %s with %d process(es)", params.input, processes)
    # Its own process group: when WikiExtractor's reader thread dies (a truncated .bz2) the
    # process never exits and its workers hold our pipe open, so a traceback on its stderr
    # ends the whole group.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace", start_new_session=True)
    stderr: list[str] = []
    threading.Thread(target=_watch_stderr, args=(proc, stderr), daemon=True).start()
    counts = {"articles": 0, "empty": 0, "written": 0, "parts": 0, "chars": 0}
    progress = Progress(log, "extract", None)
    part: _PartWriter | None = None
    try:
        for line in proc.stdout:
            counts["articles"] += 1
            article = clean_article(json.loads(line))
            if article is None:
                counts["empty"] += 1
                continue
            if part is None or part.count >= ARTICLES_PER_PART:
                if part is not None:
                    part.close()
                part = _PartWriter(writer, f"part-{counts['parts']:05d}.jsonl.gz")
                counts["parts"] += 1
            part.add(article)
            counts["written"] += 1
            counts["chars"] += len(article["text"])
            progress.update(counts["articles"], " articles")
        if proc.wait() != 0 or any(line.startswith("Traceback") for line in stderr):
            raise StepError(_explain_failure(params.input, "".join(stderr)))
        if part is not None:
            part.close()
    finally:
        if part is not None:
            part.abort()
        _kill_group(proc)
    if counts["written"] == 0:
        raise StepError(f"{params.input}: the dump holds no articles with text ({counts['articles']} "
                        "extracted, all empty): check that it is a pages-articles dump")
    print(f"extract: {counts['articles']} articles, {counts['empty']} empty dropped, {counts['written']} "
          f"written in {counts['parts']} part(s), {counts['chars'] / 1e6:.1f} M characters "
          f"in {progress.elapsed:.1f} s -> {writer.folder.uri}")
    return counts


def _watch_stderr(proc: subprocess.Popen, lines: list[str]) -> None:
    for line in proc.stderr:
        if line.startswith("Traceback") and not any(seen.startswith("Traceback") for seen in lines):
            threading.Timer(1.0, _kill_group, args=(proc,)).start()  # let the traceback finish first
        lines.append(line)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def clean_article(raw: dict) -> dict | None:
    text = _unescape(raw.get("text", ""))
    text = "\n".join(line for line in text.split("\n") if not _LONE_TAG.match(line)).strip()
    if not text:
        return None
    return {"id": raw["id"], "title": _unescape(raw["title"]), "url": raw["url"], "text": text}


def _unescape(text: str) -> str:
    """WikiExtractor leaves entities escaped, some twice (`&amp;nbsp;`): unescape to a fixed point."""
    for _ in range(3):
        if "&" not in text:
            break
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return text.replace("\u00a0", " ")


def _explain_failure(uri: str, stderr: str) -> str:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    if "Compressed file ended" in stderr or "EOFError" in stderr:
        return f"{uri}: the compressed dump is truncated (it ends before its end-of-stream marker); download it again"
    if "Invalid data stream" in stderr or "UnicodeDecodeError" in stderr:
        return f"{uri}: the dump is corrupt or not UTF-8 ({last}); download it again"
    return f"{uri}: WikiExtractor failed: {last}"


class _PartWriter:
    """One articles part, gzip-compressed as it is written to the store, committed on close."""

    def __init__(self, writer: OutputWriter, name: str):
        self.count = 0
        self._cm = writer.stream(name)  # to the store as it is compressed
        # No file name and a zero mtime in the gzip header: the same dump gives the same bytes.
        self._raw = self._cm.__enter__()
        self._gz = io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0,
                                                  compresslevel=6), encoding="utf-8")

    def add(self, article: dict) -> None:
        self._gz.write(json.dumps(article, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._gz.close()
        self._raw.close()
        self._cm.__exit__(None, None, None)
        self._cm = None

    def abort(self) -> None:
        if self._cm is not None:
            self._gz.close()
            self._raw.close()
            self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._cm = None
