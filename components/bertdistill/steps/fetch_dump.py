"""fetch-dump: copy one Wikipedia dump's pages-articles files into the store, verified.

The dump server is the source of truth twice over: `dumpstatus.json` says which files make
up the finished articles dump (and which date is the newest finished one), and the dump's
own `<wiki>-<date>-sha1sums.txt` says what each file must hash to. Downloads resume with
HTTP Range requests from a `.part` file kept in scratch space, so a killed task continues
where it stopped instead of starting a multi-GB file again.

A mirror is any tree laid out like dumps.wikimedia.org: an http(s) URL, a local path or a
file:// URL.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from bertdistill.errors import StepError, TransientError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.progress import Progress
from bertdistill.store import open_folder, scratch_dir

DEFAULT_MIRROR = "https://dumps.wikimedia.org"
USER_AGENT = "bertdistill-fetch-dump/0.1 (+https://github.com/bertdistill)"
WIKI_NAME = re.compile(r"^[a-z][a-z0-9_]*wiki[a-z]*$")
DATE = re.compile(r"^\d{8}$")
TIMEOUT_S = 60
# Where the mirror is set: the step's flag, or the pipeline's setting its tasks pass on.
MIRROR_SETTING = "--mirror (BERTDISTILL_MIRROR for the pipeline)"
log = logging.getLogger(__name__)


@dataclass
class FetchDumpParams:
    wiki: str = flag(help="wiki database name, e.g. enwiki")
    output: str = flag(help="dumps root URI; files land in <output>/<wiki>/<date>/")
    date: str = flag("latest", help="dump date YYYYMMDD, or 'latest' (newest finished dump)")
    mirror: str = flag(DEFAULT_MIRROR, help="dump server base URL, local folder or file:// URL laid out like "
                       "dumps.wikimedia.org")
    max_files: int | None = flag(None, minimum=1, help="fetch only the first N pages-articles files (default: all)")
    attempts: int = flag(4, minimum=1, help="tries per file, each resuming where the last broke off, before the "
                         "step fails (transient: the task's retry resumes it again)")
    force: bool = False


class Mirror:
    """Reads a dump mirror over HTTP(S) or from a local folder, with byte-range resume."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        parsed = urlparse(self.base)
        self.local = None if parsed.scheme in ("http", "https") else Path(parsed.path if parsed.scheme else base)

    def url(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def read(self, *parts: str) -> bytes:
        stream, _ = self.open(*parts)
        try:
            return stream.read()
        except (OSError, http.client.HTTPException) as exc:  # the connection broke off mid-answer
            raise self._unreachable(exc) from None
        finally:
            stream.close()

    def open(self, *parts: str, offset: int = 0) -> tuple[BinaryIO, int]:
        """Open for reading from `offset`; returns the stream and the offset it really starts at
        (0 when an HTTP server ignores the Range header)."""
        if self.local is not None:
            path = self.local.joinpath(*parts)
            if not path.is_file():
                raise FileNotFoundError(str(path))
            f = open(path, "rb")  # noqa: SIM115 (the caller closes the returned stream)
            f.seek(offset)
            return f, offset
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = self.url(*parts)
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(url) from None
            if exc.code == 416:  # nothing past `offset`: the partial file is already whole
                return io.BytesIO(b""), offset
            raise self._http_error(url, exc.code, exc.reason) from None
        except http.client.InvalidURL as exc:
            raise StepError(f"{url} is not a valid URL ({exc}): check {MIRROR_SETTING}") from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:  # a timeout or dropped connection before the headers
            raise self._unreachable(exc) from None
        return response, (offset if response.status == 206 else 0)

    def _http_error(self, url: str, code: int, reason: object) -> StepError:
        """A refusal other than 404: 5xx and throttling pass (transient), any other 4xx will not."""
        answer = f"the dump mirror {self.base} answered HTTP {code} {reason} for {url}"
        if code >= 500 or code in (408, 429):
            return TransientError(f"{answer}: it is down or overloaded, a retry may help; if it persists, point "
                                  f"{MIRROR_SETTING} at another mirror")
        return StepError(f"{answer}: check {MIRROR_SETTING}")

    def _unreachable(self, reason: object) -> TransientError:
        """Connection refused, DNS failure, timeout: the one-line cause, where to look, and that a retry may help."""
        return TransientError(f"cannot reach the dump mirror {self.base} ({_why(reason)}): check "
                              f"{MIRROR_SETTING} and the network; a retry may help")

    def list_dates(self, wiki: str) -> list[str]:
        if self.local is not None:
            folder = self.local / wiki
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        else:
            try:
                page = self.read(wiki + "/").decode("utf-8", "replace")
            except FileNotFoundError:  # no such wiki on this mirror: no dates, said by resolve_date
                return []
            names = re.findall(r'href="(\d{8})/?"', page)
        return sorted({n for n in names if DATE.match(n)}, reverse=True)


def _why(reason: object) -> str:
    """urllib's cause in a few words: its own text is often an errno tuple or a nested repr."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"host name not found: {reason.strerror or reason}"
    if isinstance(reason, TimeoutError):
        return f"no answer within {TIMEOUT_S} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def resolve_date(mirror: Mirror, wiki: str, date: str, as_of: datetime | None = None) -> tuple[str, dict]:
    """The dump date to fetch and its dumpstatus.json; 'latest' is the newest finished one.

    With `as_of` (a pipeline run's logical time), 'latest' is the newest dump that was finished
    at that time (its articles job's `updated` stamp, UTC), so a cleared or retried run
    distills the dump it distilled the first time, even after a newer one appeared.
    """
    candidates = [date] if date != "latest" else mirror.list_dates(wiki)
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    if as_of is not None and date == "latest":
        candidates = [c for c in candidates if c <= f"{as_of:%Y%m%d}"]
    candidates = candidates[:6]
    if not candidates:
        raise StepError(f"no dump dates listed for {wiki!r} at {mirror.url(wiki)}/"
                        + (f" on or before {as_of:%Y-%m-%d}" if as_of else "") + ": check --wiki and --mirror")
    for candidate in candidates:
        try:
            status = json.loads(mirror.read(wiki, candidate, "dumpstatus.json"))
        except FileNotFoundError:
            if date != "latest":
                raise StepError(f"no dump {wiki}/{candidate} at {mirror.base} (dumpstatus.json not found): "
                                f"check --wiki and --date (the dates it has are listed at {mirror.url(wiki)}/, "
                                "or use --date latest) and --mirror") from None
            continue
        except ValueError as exc:
            raise StepError(f"{mirror.url(wiki, candidate, 'dumpstatus.json')} is not valid JSON: {exc}") from None
        job = status.get("jobs", {}).get("articlesdump", {}) if isinstance(status, dict) else {}
        if job.get("status") == "done" and job.get("files") and _finished_by(job, as_of if date == "latest" else None):
            return candidate, status
        if date != "latest":
            raise StepError(f"dump {wiki}/{candidate} is not finished (articlesdump status "
                            f"{job.get('status')!r}); pick another --date or use latest")
    raise StepError(f"none of the newest dumps of {wiki} ({', '.join(candidates)}) has a finished "
                    "articles dump yet; try again later or name an older --date")


def _finished_by(job: dict, as_of: datetime | None) -> bool:
    """Whether a finished job was finished at `as_of` (no stamp: yes, its date already passed)."""
    if as_of is None or not job.get("updated"):
        return True
    try:
        updated = datetime.strptime(job["updated"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return True
    return updated <= as_of


def selected_files(status: dict, max_files: int | None) -> list[str]:
    """The pages-articles files a run fetches: in the dump's order, the first max_files of them."""
    return sorted(status["jobs"]["articlesdump"]["files"], key=_file_order)[:max_files]


def selected_bytes(status: dict, max_files: int | None) -> int | None:
    """Their compressed size from dumpstatus.json (None when a file has no size listed)."""
    files = status["jobs"]["articlesdump"]["files"]
    sizes = [files[name].get("size") for name in selected_files(status, max_files)]
    return None if any(s is None for s in sizes) else sum(int(s) for s in sizes)


def _file_order(name: str) -> tuple[int, str]:
    match = re.search(r"pages-articles(\d*)\.xml", name)
    return (int(match.group(1) or 0) if match else 0, name)


def parse_sha1sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{40}", parts[0]):
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def run(params: FetchDumpParams) -> Manifest:
    if not WIKI_NAME.match(params.wiki):
        raise StepError(f"--wiki {params.wiki!r} is not a wiki database name such as enwiki or dewiki")
    if params.date != "latest" and not DATE.match(params.date):
        raise StepError(f"--date {params.date!r} must be 'latest' or YYYYMMDD")
    if params.max_files is not None and params.max_files < 1:
        raise StepError(f"--max-files must be at least 1, got {params.max_files}")
    mirror = Mirror(params.mirror)
    date, status = resolve_date(mirror, params.wiki, params.date)
    files = selected_files(status, params.max_files)
    sums_name = f"{params.wiki}-{date}-sha1sums.txt"
    try:
        sums = parse_sha1sums(mirror.read(params.wiki, date, sums_name).decode())
    except FileNotFoundError:
        raise StepError(f"{mirror.url(params.wiki, date, sums_name)} not found: cannot verify the dump") from None
    missing = [f for f in files if f not in sums]
    if missing:
        raise StepError(f"{sums_name} lists no sha1 for {', '.join(missing)}: the mirror looks incomplete")
    output = open_folder(params.output).join(params.wiki, date)
    log.info("fetch-dump: %s %s, %d file(s) -> %s", params.wiki, date, len(files), output.uri)

    def work(writer: OutputWriter) -> dict:
        started, total = time.monotonic(), 0
        try:
            for name in files:
                size = status["jobs"]["articlesdump"]["files"][name].get("size")
                size = int(size) if size is not None else None
                if _already_verified(output, name, sums[name], size):
                    log.info("fetch-dump: %s is already in %s with its sha1; not downloaded again", name, output.uri)
                    writer.adopt(name)
                else:
                    _download_verified(mirror, params.wiki, date, name, sums[name], output.child_uri(name), writer,
                                       size, params.attempts)
                writer.note(name, sha1=sums[name])
                total += writer.files[name]["bytes"]
        except BaseException:
            # A file that matched the dump's own sha1 is right whatever happens next: keep it, so
            # the rerun (a retry, maybe in a new pod with an empty scratch) downloads only the rest.
            for name in list(writer.files):
                writer.keep(name)
            raise
        seconds = time.monotonic() - started
        print(f"fetch-dump: {params.wiki} {date}: {len(files)} file(s), {total / 1e6:.1f} MB verified "
              f"in {seconds:.1f} s -> {output.uri}")
        return {"wiki": params.wiki, "date": date, "files": len(files), "bytes": total, "folder": output.uri}

    fingerprint = {k: v for k, v in asdict(params).items() if k in ("wiki", "max_files")}
    fingerprint.update(date=date, sha1=[sums[f] for f in files])
    return run_step("fetch-dump", fingerprint, {}, output, work, force=params.force)


def _already_verified(output, name: str, sha1: str, size: int | None) -> bool:
    """Whether an earlier, failed run left this file complete under its final name (read back and
    checked against the dump's sha1: reading the store is much cheaper than the mirror)."""
    if not output.exists(name) or (size is not None and output.size(name) != size):
        return False
    digest = hashlib.sha1()
    with output.open_read(name) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == sha1


def _download_verified(mirror: Mirror, wiki: str, date: str, name: str, sha1: str, dest_uri: str,
                       writer: OutputWriter, expected_size: int | None, attempts: int) -> None:
    """Download to a resumable .part file, check its sha1, then commit it into the store."""
    part = scratch_dir() / "partial" / (hashlib.sha1(dest_uri.encode()).hexdigest()[:16] + "-" + name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            _append_from(mirror, (wiki, date, name), part, have, expected_size)
            break
        except FileNotFoundError:
            raise StepError(f"{mirror.url(wiki, date, name)} not found on the mirror") from None
        except (OSError, urllib.error.URLError, TransientError, _Interrupted) as exc:  # all may pass: resume
            if attempt == attempts:
                raise TransientError(f"downloading {mirror.url(wiki, date, name)} failed {attempts} times ({exc}); "
                                f"{part.stat().st_size if part.exists() else 0:,} bytes are kept in {part}, "
                                "rerun to resume") from None
            log.warning("download of %s interrupted (%s); resuming (attempt %d/%d)", name, exc,
                        attempt + 1, attempts)
            time.sleep(min(2 ** attempt, 30) * 0.25)
    got_sha1 = _sha1(part)
    if got_sha1 != sha1:
        part.unlink(missing_ok=True)
        raise StepError(f"{name}: sha1 {got_sha1} does not match {sha1} from the dump's sha1sums file; "
                        "the download was discarded, rerun to fetch it again")
    with writer.write(name) as pending:
        shutil.move(part, pending.path)


class _Interrupted(Exception):
    pass


def _append_from(mirror: Mirror, parts: tuple[str, ...], part: Path, have: int, expected: int | None) -> None:
    if expected is not None and have >= expected:
        return
    stream, start = mirror.open(*parts, offset=have)
    progress = Progress(log, f"downloading {parts[-1]}", expected)
    with stream, open(part, "ab" if start == have and have else "wb") as out:
        done = start
        while chunk := stream.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            progress.update(done, " B")
    if expected is not None and done != expected:
        raise _Interrupted(f"connection closed after {done:,} of {expected:,} bytes")


def _sha1(path: Path) -> str:
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha1.update(chunk)
    return sha1.hexdigest()
