"""fetch-dump against a loopback HTTP server that serves the sample like the dump server."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

from bertdistill.errors import StepError, TransientError
from bertdistill.sample import SAMPLE_DATE
from bertdistill.steps import fetch_dump
from bertdistill.steps.fetch_dump import Mirror, resolve_date
from tests.conftest import error_lines, free_port, run_cli

FILE = f"enwiki-{SAMPLE_DATE}-pages-articles1.xml-p10p30302.bz2"


class DumpServer(http.server.ThreadingHTTPServer):
    """Serves a mirror folder with directory listings and Range requests.

    `cut_after` makes the next N responses of a dump file stop after that many bytes, the
    way a dropped connection does; `ranges` records the Range headers it was sent.
    """

    def __init__(self, root: Path):
        self.root = root
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.ranges: list[str] = []
        self.cut_only = ""  # cut only files whose name contains this
        self.served: list[str] = []  # paths of dump files sent
        self.fail_with: int | None = None  # answer every request with this HTTP status
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: DumpServer = self.server
        if server.fail_with is not None:
            return self._send(server.fail_with, b"failing on purpose", "text/plain")
        path = server.root / self.path.lstrip("/")
        if path.is_dir():
            links = "".join(f'<a href="{p.name}/">{p.name}/</a>\n' for p in sorted(path.iterdir()))
            return self._send(200, links.encode(), "text/html")
        if not path.is_file():
            return self._send(404, b"not found", "text/plain")
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            server.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                return self._send(416, b"", "text/plain")
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if path.suffix == ".bz2":
            server.served.append(path.name)
        if (path.suffix == ".bz2" and server.cuts_left and server.cut_after is not None
                and server.cut_only in path.name):
            server.cuts_left -= 1
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send(self, code: int, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def mirror(tmp_path, sample) -> Path:
    root = tmp_path / "mirror"
    shutil.copytree(sample / "mirror", root)
    return root


@pytest.fixture
def server(mirror):
    srv = DumpServer(mirror)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _scratch(tmp_path) -> dict:
    return {"BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}


def test_latest_skips_an_unfinished_newer_dump(server, mirror, tmp_path):
    newer = mirror / "enwiki" / "20991231"
    newer.mkdir()
    (newer / "dumpstatus.json").write_text(json.dumps({"jobs": {"articlesdump": {"status": "in-progress"}}}))
    out = tmp_path / "dumps"
    proc = run_cli("fetch-dump", "--wiki", "enwiki", "--date", "latest", "--mirror", server.url,
                   "--output", str(out), env=_scratch(tmp_path), check=True)
    got = out / "enwiki" / SAMPLE_DATE / FILE
    assert _sha1(got) == _sha1(mirror / "enwiki" / SAMPLE_DATE / FILE)
    manifest = json.loads((out / "enwiki" / SAMPLE_DATE / "_MANIFEST.json").read_text())
    assert manifest["summary"]["date"] == SAMPLE_DATE and manifest["outputs"][FILE]["sha1"]
    assert "1 file(s)" in proc.stdout
    again = run_cli("fetch-dump", "--wiki", "enwiki", "--mirror", server.url, "--output", str(out),
                    env=_scratch(tmp_path), check=True)
    assert "skipped" in again.stderr


def test_interrupted_download_resumes_with_a_range_request(server, mirror, tmp_path):
    server.cut_after, server.cuts_left = 300_000, 1
    out = tmp_path / "dumps"
    run_cli("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url,
            "--output", str(out), env=_scratch(tmp_path), check=True)
    assert server.ranges == ["bytes=300000-"]
    assert _sha1(out / "enwiki" / SAMPLE_DATE / FILE) == _sha1(mirror / "enwiki" / SAMPLE_DATE / FILE)


def test_a_partial_file_from_a_killed_run_is_resumed(server, mirror, tmp_path):
    """A .part left by an earlier (killed) run is continued, not downloaded again."""
    server.cut_after, server.cuts_left = 100_000, 4  # every attempt of this run is cut short
    out = tmp_path / "dumps"
    first = run_cli("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url,
                    "--output", str(out), env=_scratch(tmp_path))
    assert first.returncode == 1 and "rerun to resume" in error_lines(first)[0]  # transient: the task retries
    assert not (out / "enwiki" / SAMPLE_DATE / FILE).exists()
    server.ranges.clear()
    run_cli("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url,
            "--output", str(out), env=_scratch(tmp_path), check=True)
    assert server.ranges == ["bytes=400000-"]
    assert _sha1(out / "enwiki" / SAMPLE_DATE / FILE) == _sha1(mirror / "enwiki" / SAMPLE_DATE / FILE)


def test_attempts_bounds_the_tries_per_file(server, mirror, tmp_path):
    """Two cuts: --attempts 2 gives up with 200,000 bytes kept (transient, exit 1); --attempts 3 resumes twice."""
    out, fetch = tmp_path / "dumps", ("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url)
    server.cut_after, server.cuts_left = 100_000, 2
    proc = run_cli(*fetch, "--output", str(out), "--attempts", "2", env=_scratch(tmp_path / "a"))
    assert proc.returncode == 1 and "failed 2 times" in error_lines(proc)[0] and "200,000 bytes are kept" in proc.stderr
    server.cut_after, server.cuts_left = 100_000, 2
    server.ranges.clear()
    run_cli(*fetch, "--output", str(out), "--attempts", "3", env=_scratch(tmp_path / "b"), check=True)
    assert server.ranges == ["bytes=100000-", "bytes=200000-"]
    assert _sha1(out / "enwiki" / SAMPLE_DATE / FILE) == _sha1(mirror / "enwiki" / SAMPLE_DATE / FILE)


def test_sha1_mismatch_is_refused_and_leaves_nothing(server, mirror, tmp_path):
    sums = mirror / "enwiki" / SAMPLE_DATE / f"enwiki-{SAMPLE_DATE}-sha1sums.txt"
    sums.write_text(f"{'0' * 40}  {FILE}\n")
    out = tmp_path / "dumps"
    proc = run_cli("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url,
                   "--output", str(out), env=_scratch(tmp_path))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert FILE in line and "does not match" in line
    assert not list(out.rglob("*")) or all(p.is_dir() for p in out.rglob("*"))


def test_local_and_file_url_mirrors(mirror, tmp_path):
    for source in (str(mirror), f"file://{mirror}"):
        out = tmp_path / source.replace("/", "_")
        run_cli("fetch-dump", "--wiki", "enwiki", "--mirror", source, "--output", str(out),
                "--max-files", "1", env=_scratch(tmp_path), check=True)
        assert (out / "enwiki" / SAMPLE_DATE / FILE).is_file()


@pytest.mark.parametrize("args, message", [
    (["--wiki", "en wiki"], "not a wiki database name"),
    (["--wiki", "enwiki", "--date", "2016-01-01"], "must be 'latest' or YYYYMMDD"),
    (["--wiki", "dewiki"], "no dump dates listed"),
    (["--wiki", "enwiki", "--date", "20150101"], "no dump enwiki/20150101"),
])
def test_bad_parameters(mirror, tmp_path, args, message):
    proc = run_cli("fetch-dump", *args, "--mirror", str(mirror), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert message in error_lines(proc)[0]
    assert not (tmp_path / "o").exists()


def test_a_run_that_fails_on_a_later_file_keeps_the_verified_ones_for_a_new_pod(server, mirror, tmp_path):
    """Killed after file 1 of 2 (file 2 keeps breaking off): file 1 stays, and a rerun with an empty
    scratch (a new pod) checks it against the sha1 and downloads only file 2."""
    folder = mirror / "enwiki" / SAMPLE_DATE
    second = FILE.replace("articles1.xml-p10p30302", "articles2.xml-p30303p40000")
    shutil.copyfile(folder / FILE, folder / second)
    status = json.loads((folder / "dumpstatus.json").read_text())
    files = status["jobs"]["articlesdump"]["files"]
    files[second] = dict(files[FILE])
    (folder / "dumpstatus.json").write_text(json.dumps(status))
    sums = folder / f"enwiki-{SAMPLE_DATE}-sha1sums.txt"
    sums.write_text(sums.read_text() + f"{_sha1(folder / second)}  {second}\n")
    server.cut_after, server.cuts_left, server.cut_only = 50_000, 100, "articles2"
    out = tmp_path / "dumps"
    first = run_cli("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url,
                    "--output", str(out), env=_scratch(tmp_path))
    assert first.returncode == 1 and second in error_lines(first)[0]
    kept = out / "enwiki" / SAMPLE_DATE
    assert _sha1(kept / FILE) == _sha1(folder / FILE) and not (kept / second).exists()
    assert not (kept / "_MANIFEST.json").exists()  # not done: one file is missing
    server.cuts_left, server.served = 0, []
    run_cli("fetch-dump", "--wiki", "enwiki", "--date", SAMPLE_DATE, "--mirror", server.url,
            "--output", str(out), env={"BERTDISTILL_SCRATCH": str(tmp_path / "new-pod")}, check=True)
    assert server.served == [second]
    manifest = json.loads((kept / "_MANIFEST.json").read_text())
    assert sorted(manifest["outputs"]) == sorted([FILE, second])
    assert _sha1(kept / second) == _sha1(folder / second)


@pytest.mark.parametrize("date", ["latest", SAMPLE_DATE])
def test_an_unreachable_mirror_is_one_transient_error_line(tmp_path, date):
    """Connection refused: exit 1 (a retry may help), one `error:` line naming the mirror and where it is
    set, no traceback, nothing written."""
    mirror = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    out = tmp_path / "dumps"
    proc = run_cli("fetch-dump", "--wiki", "enwiki", "--date", date, "--mirror", mirror, "--output", str(out),
                   env=_scratch(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert line.startswith(f"error: fetch-dump: cannot reach the dump mirror {mirror} (connection refused)")
    assert "--mirror" in line and "BERTDISTILL_MIRROR" in line
    assert not out.exists()


def test_resolve_date_says_which_mirror_it_cannot_reach():
    """check_dump (the DAG's first task) calls resolve_date directly: the same one-line cause, no urllib chain."""
    mirror = f"http://127.0.0.1:{free_port()}"
    for date in ("latest", SAMPLE_DATE):
        with pytest.raises(TransientError, match=re.escape(f"cannot reach the dump mirror {mirror} ")) as caught:
            resolve_date(Mirror(mirror), "enwiki", date)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("code, error", [(503, TransientError), (403, StepError)])
def test_a_mirror_that_answers_with_an_error_status(server, code, error):
    """A 5xx may pass (transient); another refusal will not. Both name the mirror and the status."""
    server.fail_with = code
    with pytest.raises(error, match=f"the dump mirror {re.escape(server.url)} answered HTTP {code}") as caught:
        resolve_date(Mirror(server.url), "enwiki", "latest")
    assert (type(caught.value) is TransientError) == (code == 503)


def test_a_date_the_mirror_does_not_have_is_bad_input(server):
    """A 404 for a named date: exit 2, naming the date and where the dates are listed."""
    with pytest.raises(StepError) as caught:
        resolve_date(Mirror(server.url), "enwiki", "20150101")
    assert type(caught.value) is StepError
    assert "no dump enwiki/20150101" in str(caught.value) and f"listed at {server.url}/enwiki/" in str(caught.value)


def test_a_mirror_that_never_answers_times_out_as_transient(monkeypatch):
    """A server that takes the connection and says nothing: after the timeout, the same one-line cause."""
    monkeypatch.setattr(fetch_dump, "TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mirror = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TransientError, match=re.escape(f"{mirror} (no answer within 0.5 s)")):
            resolve_date(Mirror(mirror), "enwiki", "latest")


def test_a_host_name_that_does_not_resolve_is_said_in_words():
    assert fetch_dump._why(socket.gaierror(-2, "Name or service not known")) == (
        "host name not found: Name or service not known")
