"""extract: one dump file -> articles JSONL.gz (id, title, url, text, page_key), via WikiExtractor.

WikiExtractor does the wikitext-to-plain-text work; this step wraps it in the checks it
lacks. It exits 0 with no output on a dump without `<siteinfo>`, on a file that is not XML
at all, and on UTF-16 text, so those are recognised up front from the first bytes; a
truncated .bz2 makes it die with a traceback, which is turned into one clear line. It
also leaves HTML entities (`&amp;`, `&lt;`, some double-escaped) in titles and text: they
are unescaped here. Redirects never reach the output (WikiExtractor skips them) and empty
articles are dropped.

Given last month's articles (`--reuse`), a page whose XML has not changed since, in a dump with the
same base URL and namespaces, has its article line copied from there (dump_pages.py says why that
is the same line), and WikiExtractor runs on a dump of the other pages only. The output is the same
bytes either way: the copied lines take their pages' places in dump order, on which build-corpus'
document order, make-examples' chunks and so label-teacher's reuse depend.
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
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bertdistill import children, dump_pages
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, committed_input, is_manifest, run_step
from bertdistill.progress import Progress
from bertdistill.store import open_folder, scratch_dir, split_uri

ARTICLES_PER_PART = 50_000
_LONE_TAG = re.compile(r"^\s*</?[A-Za-z][^<>]*>\s*$")  # <onlyinclude> and friends WikiExtractor leaves
HEAD_BYTES = 1 << 16
SCHEMA = 2  # 2: every article line ends with its page's key
_PAGE_KEY = re.compile(rb'"page_key": "([0-9a-f]{32})"}\s*$')  # how _PartWriter writes it, last
log = logging.getLogger(__name__)


@dataclass
class ExtractParams:
    input: str = flag(help="dump file URI (.xml, .xml.bz2)")
    output: str = flag(help="articles folder URI (part-NNNNN.jsonl.gz)")
    processes: int = flag(0, help="WikiExtractor processes (0: one per available core)")
    reuse: list[str] | None = flag(None, help="last month's articles folder URI(s) (extract's outputs): the "
                                   "article of a page whose XML is unchanged is copied from there, not extracted")
    force: bool = False


def run(params: ExtractParams) -> Manifest:
    folder, name = split_uri(params.input)
    output = open_folder(params.output)

    def work(writer: OutputWriter) -> dict:
        with folder.local_copy(name) as path:
            check_dump_head(path, params.input)
            return _extract(path, params, writer)

    # --reuse is not an input: the output is the same bytes with or without it.
    return run_step("extract", {"schema": SCHEMA}, {"dump": params.input}, output, work, force=params.force)


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


@dataclass
class _Pages:
    """The dump's pages in order (id, key), and what WikiExtractor reads of its <siteinfo>."""

    siteinfo: str = ""
    order: list[tuple[str, str]] = field(default_factory=list)


def _scan(path: Path, uri: str) -> _Pages:
    pages = _Pages()
    try:
        with _open_any(path) as f:
            for kind, xml in dump_pages.split(f):
                if kind == "head":
                    pages.siteinfo = dump_pages.siteinfo_key(xml)
                elif kind == "page":
                    pages.order.append((dump_pages.page_id(xml), dump_pages.page_key(xml)))
    except EOFError as exc:
        raise StepError(_explain_failure(uri, f"EOFError: {exc}")) from None
    except OSError as exc:
        raise StepError(_explain_failure(uri, f"Invalid data stream: {exc}")) from None
    return pages


class _Reused:
    """Last month's article lines for this dump's unchanged pages, by page key, kept in a scratch file
    (an articles part of a real dump is about a gigabyte of text)."""

    def __init__(self, scratch: Path):
        self.file = open(scratch / "reused.jsonl", "w+b")  # noqa: SIM115 (closed with the scratch folder)
        self.where: dict[str, tuple[int, int]] = {}
        self.used: list[str] = []

    def read(self, uris: list[str], pages: _Pages) -> None:
        wanted = {key for _id, key in pages.order}
        for uri in uris:
            try:
                made = committed_input(uri, "extract")
            except StepError as exc:
                log.info("extract: not reusing %s (%s)", uri, exc)
                continue
            if made.params != {"schema": SCHEMA}:
                log.info("extract: not reusing %s (articles of another format: %s)", uri, made.params)
                continue
            if made.summary.get("siteinfo") != pages.siteinfo:
                log.info("extract: not reusing %s (a dump of another base URL or namespaces)", uri)
                continue
            folder, found = open_folder(uri), {}
            try:
                for name in sorted(n for n in made.outputs if n.endswith(".jsonl.gz") and not is_manifest(n)):
                    with folder.open_read(name) as raw, gzip.open(raw, "rb") as lines:
                        for line in lines:
                            found_key = _PAGE_KEY.search(line)
                            key = found_key.group(1).decode() if found_key else ""
                            if key in wanted and key not in self.where and key not in found:
                                found[key] = (self.file.tell(), len(line))
                                self.file.write(line)
            except (OSError, EOFError) as exc:  # a part that cannot be read is not trusted in part either
                log.warning("extract: not reusing %s: reading it failed (%s)", uri, exc)
                continue
            self.where.update(found)
            self.used.append(uri)
        self.file.flush()

    def line(self, key: str) -> str:
        offset, length = self.where[key]
        self.file.seek(offset)
        return self.file.read(length).decode("utf-8")


def _filtered_dump(path: Path, pages: _Pages, reused: _Reused, out: Path) -> int:
    """The dump without the pages whose articles are copied: what WikiExtractor still has to read.
    The pages come in the order _scan met them, so their keys are not computed again."""
    keys = iter(key for _id, key in pages.order)
    kept = 0
    with _open_any(path) as f, open(out, "wb") as filtered:
        for kind, xml in dump_pages.split(f):
            if kind != "page" or next(keys) not in reused.where:
                filtered.write(xml)
                kept += kind == "page"
    return kept


def _extract(path: Path, params: ExtractParams, writer: OutputWriter) -> dict:
    pages = _scan(path, params.input)
    with tempfile.TemporaryDirectory(dir=scratch_dir(), prefix="extract-") as scratch:
        reused = _Reused(Path(scratch))
        with reused.file:
            if params.reuse:
                reused.read(params.reuse, pages)
            source = path
            if reused.where:
                source = Path(scratch) / "pages.xml"
                left = _filtered_dump(path, pages, reused, source)
                log.info("extract: %d of %d pages unchanged since %s; WikiExtractor runs on the other %d",
                         len(reused.where), len(pages.order), ", ".join(reused.used), left)
            counts = _write(_articles(source, params, pages, reused), writer, params.input)
    counts.update(siteinfo=pages.siteinfo, reused=len(reused.where), reused_from=reused.used)
    return counts


def _articles(source: Path, params: ExtractParams, pages: _Pages, reused: _Reused) -> Iterator[dict | str | None]:
    """Every article in dump order: a dict from WikiExtractor (None when it has no text), or the line
    copied from last month, in the place its page holds in the dump."""
    position = {page_id: i for i, (page_id, _key) in enumerate(pages.order)}
    copies = [(i, key) for i, (_id, key) in enumerate(pages.order) if key in reused.where]
    done = 0
    for raw in _wikiextractor(source, params):
        at = position.get(raw["id"], len(pages.order))
        while done < len(copies) and copies[done][0] < at:
            yield reused.line(copies[done][1])
            done += 1
        article = clean_article(raw)
        if article is not None and at < len(pages.order):
            article["page_key"] = pages.order[at][1]
        yield article
    for _i, key in copies[done:]:
        yield reused.line(key)


def _write(articles: Iterator[dict | str | None], writer: OutputWriter, uri: str) -> dict:
    counts = {"articles": 0, "empty": 0, "written": 0, "parts": 0, "chars": 0}
    progress = Progress(log, "extract", None)
    part: _PartWriter | None = None
    try:
        for article in articles:
            counts["articles"] += 1
            if article is None:
                counts["empty"] += 1
                continue
            if part is None or part.count >= ARTICLES_PER_PART:
                if part is not None:
                    part.close()
                part = _PartWriter(writer, f"part-{counts['parts']:05d}.jsonl.gz")
                counts["parts"] += 1
            counts["chars"] += part.add(article)
            counts["written"] += 1
            progress.update(counts["articles"], " articles")
        if part is not None:
            part.close()
    finally:
        if part is not None:
            part.abort()
    if counts["written"] == 0:
        raise StepError(f"{uri}: the dump holds no articles with text ({counts['articles']} "
                        "extracted, all empty): check that it is a pages-articles dump")
    print(f"extract: {counts['articles']} articles, {counts['empty']} empty dropped, {counts['written']} "
          f"written in {counts['parts']} part(s), {counts['chars'] / 1e6:.1f} M characters "
          f"in {progress.elapsed:.1f} s -> {writer.folder.uri}")
    return counts


def _wikiextractor(path: Path, params: ExtractParams) -> Iterator[dict]:
    """WikiExtractor's articles, in dump order (its workers' output is put back in order)."""
    processes = params.processes or len(os.sched_getaffinity(0))
    # Through bertdistill.children: WikiExtractor and the workers it forks die with this step, even SIGKILLed.
    command = children.module_command("wikiextractor.WikiExtractor", "--json", "--no-templates",
                                      "--processes", str(processes), "-q", "-o", "-", str(path))
    log.info("extract: running WikiExtractor on %s with %d process(es)", path.name, processes)
    # Its own process group: when WikiExtractor's reader thread dies (a truncated .bz2) the
    # process never exits and its workers hold our pipe open, so a traceback on its stderr
    # ends the whole group.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace", start_new_session=True)
    stderr: list[str] = []
    threading.Thread(target=_watch_stderr, args=(proc, stderr), daemon=True).start()
    try:
        for line in proc.stdout:
            yield json.loads(line)
        if proc.wait() != 0 or any(line.startswith("Traceback") for line in stderr):
            raise StepError(_explain_failure(params.input, "".join(stderr)))
    finally:
        _kill_group(proc)


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

    def add(self, article: dict | str) -> int:
        """Writes the article (a line copied from last month as it is); returns its text's length."""
        line = article if isinstance(article, str) else json.dumps(article, ensure_ascii=False) + "\n"
        self._gz.write(line)
        self.count += 1
        return len(article["text"]) if isinstance(article, dict) else len(json.loads(line)["text"])

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
