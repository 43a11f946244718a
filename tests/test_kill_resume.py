"""SIGKILL a step at several moments, then rerun it: the result equals an uninterrupted run,
no partial file ever appears under a final name, and no process the step started outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from bertdistill import children
from tests.conftest import commit_as, run_cli

pytestmark = pytest.mark.slow  # steps killed and rerun as processes

DELAYS = (0.3, 0.6, 0.9, 1.4)
ORPHAN_GRACE_S = 5.0  # how long what a killed step started may take to die with it
KILL_MARKER = "BERTDISTILL_TEST_KILLED_STEP"  # in the killed step's environment, so in all it starts


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _comparable(files: dict[str, bytes]) -> dict[str, object]:
    """File contents, with manifests reduced to what must not vary (not their timestamps)."""
    out: dict[str, object] = {}
    for name, data in files.items():
        if Path(name).name.startswith("_MANIFEST"):
            manifest = json.loads(data)
            out[name] = (manifest["params"], manifest["outputs"])
        else:
            out[name] = data
    return out


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie: a zombie is dead, only not yet reaped (by PID 1 or by us)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes with KILL_MARKER=marker in their environment: all a step started, forked or run,
    even those started after we last looked and those already reparented to PID 1."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(KILL_MARKER) == marker and _alive(proc):
                found.append(proc)
    return found


def _survivors(find: Callable[[], list[psutil.Process]], grace_s: float = ORPHAN_GRACE_S) -> list[psutil.Process]:
    """What `find` still finds alive after up to grace_s seconds."""
    deadline = time.monotonic() + grace_s
    while (alive := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:120]}")
    return "\n".join(lines)


def _kill_after(args: list[str], delay: float, env: dict) -> int:
    """SIGKILL the step alone (as the OOM killer, or a killed task's runner, does), then check that
    every process it had started died with it. Returns how many it had running when killed."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "bertdistill.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **env, KILL_MARKER: marker})
    time.sleep(delay)
    started = _descendants(proc.pid)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = _survivors(lambda: _marked(marker))
    description = _describe(survivors)
    for p in survivors:  # a failing run leaves nothing behind either
        with contextlib.suppress(psutil.Error):
            p.kill()
    if survivors:
        pytest.fail(f"{ORPHAN_GRACE_S:.0f} s after a kill at {delay}s, its children live on:\n{description}")
    return len(started)


def _check_kill_and_resume(args: list[str], output: Path, reference: Path, env: dict | None = None,
                           delays: tuple[float, ...] = DELAYS) -> tuple[int, int]:
    """Kill and rerun once per delay; returns (kills that landed before the manifest, kills of a step
    that had started processes)."""
    expected = _comparable(_files(reference))
    interrupted = with_children = 0
    for delay in delays:
        with_children += _kill_after(args, delay, env or {}) > 0
        visible = {n: d for n, d in _files(output).items() if ".tmp-" not in n}
        for name, data in visible.items():
            if not Path(name).name.startswith("_MANIFEST"):
                assert data == expected.get(name), f"{name} is partial or wrong after a kill at {delay}s"
        interrupted += not any(Path(n).name.startswith("_MANIFEST") for n in visible)
        run_cli(*args, env=env, check=True)
        assert _comparable({n: d for n, d in _files(output).items() if ".tmp-" not in n}) == expected
        assert not any(".tmp-" in n for n in _files(output)), "the rerun removed stale temporaries"
        for path in sorted(output.rglob("*"), reverse=True):  # start over for the next delay
            path.unlink() if path.is_file() else path.rmdir()
    return interrupted, with_children


@pytest.fixture(autouse=True)
def own_scratch(tmp_path, monkeypatch):
    """A SIGKILLed step cannot remove its scratch (make-examples' shuffle buckets, staged downloads); a
    pod's emptyDir goes with the pod, so here the test's folder plays that part instead of /tmp."""
    monkeypatch.setenv("BERTDISTILL_SCRATCH", str(tmp_path / "scratch"))


@pytest.fixture(scope="module")
def big_text(tmp_path_factory, all_text) -> Path:
    """Four copies of the sample's text, so make-examples runs long enough to be caught mid-way; committed
    as build-corpus commits its shards, since make-examples reads only a finished build-corpus output."""
    folder = tmp_path_factory.mktemp("big")
    path = folder / "train" / "shard-00000.txt"
    path.parent.mkdir()
    text = all_text.read_text(encoding="utf-8")
    path.write_text(text * 4, encoding="utf-8")
    commit_as("build-corpus", folder)
    return path


def test_make_examples(big_text, sample, tmp_path):
    def args(out: Path) -> list[str]:
        return ["make-examples", "--input", str(big_text), "--output", str(out / "shard-00000.tfrecord"),
                "--vocab-file", str(sample / "vocab.txt"), "--dupe-factor", "3", "--workers", "2"]

    run_cli(*args(tmp_path / "ref"), check=True)
    interrupted, with_children = _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref")
    assert interrupted >= 2, "the kills should land while the step is still working"
    assert with_children >= 2, "the kills should land while the step's workers run"


def test_extract(sample_dump, tmp_path):
    def args(out: Path) -> list[str]:
        return ["extract", "--input", str(sample_dump), "--output", str(out)]

    run_cli(*args(tmp_path / "ref"), check=True)
    interrupted, with_children = _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref")
    assert interrupted >= 1
    assert with_children >= 1, "a kill should land while WikiExtractor and its workers run"


def test_build_corpus(corpus, tmp_path):
    articles = tmp_path / "articles"
    articles.mkdir()
    for i in range(4):  # four parts, so the step runs long enough to be caught mid-way
        shutil.copyfile(corpus / "articles" / "part-00000.jsonl.gz", articles / f"part-{i:05d}.jsonl.gz")
    commit_as("extract", articles)
    def args(out: Path) -> list[str]:
        return ["build-corpus", "--input", str(articles), "--output", str(out),
                "--train-shards", "3", "--heldout-shards", "1"]

    run_cli(*args(tmp_path / "ref"), check=True)
    interrupted, _ = _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref",
                                            delays=(0.2, 0.35, 0.5, 0.65))
    assert interrupted >= 1


def test_fetch_dump(sample, tmp_path):
    def args(out: Path) -> list[str]:
        return ["fetch-dump", "--wiki", "enwiki", "--mirror", str(sample / "mirror"), "--output", str(out)]

    run_cli(*args(tmp_path / "ref"), check=True)
    _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref")


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
# A parent that starts a sleeper through children.preexec_fn() in its own session (as the local
# runner starts a step), prints the sleeper's pid and waits to be killed.
PARENT = ("import subprocess, sys, time; from bertdistill import children; "
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True, "
          "preexec_fn=children.preexec_fn()); print(p.pid, flush=True); time.sleep(60)")


@LINUX_ONLY
def test_preexec_child_dies_with_its_sigkilled_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    survivors = _survivors(lambda: [child] if _alive(child) else [])
    for p in survivors:
        p.kill()
    assert not survivors, "a child started with children.preexec_fn() outlived its SIGKILLed parent"


@LINUX_ONLY
def test_child_whose_parent_already_died_exits():
    """The race: a parent that dies before the child's prctl sends no signal; the child sees it and exits."""
    not_the_parent = 1  # as if ours had died and the child had been reparented
    proc = subprocess.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=20,
                          preexec_fn=lambda: children.die_with_parent(not_the_parent))
    assert proc.returncode == 1
