"""SIGKILL a step at several moments, then rerun it: the result equals an uninterrupted run,
and no partial file ever appears under a final name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # steps killed and rerun as processes

DELAYS = (0.3, 0.6, 0.9, 1.4)


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


def _kill_after(args: list[str], delay: float, env: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bertdistill.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **env})
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole task: its workers die with it, as in a pod
    proc.wait()


def _check_kill_and_resume(args: list[str], output: Path, reference: Path, env: dict | None = None,
                           delays: tuple[float, ...] = DELAYS) -> int:
    expected = _comparable(_files(reference))
    interrupted = 0
    for delay in delays:
        _kill_after(args, delay, env or {})
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
    return interrupted


@pytest.fixture(scope="module")
def big_text(tmp_path_factory, all_text) -> Path:
    """Four copies of the sample's text, so make-examples runs long enough to be caught mid-way."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    text = all_text.read_text(encoding="utf-8")
    path.write_text(text * 4, encoding="utf-8")
    return path


def test_make_examples(big_text, sample, tmp_path):
    def args(out: Path) -> list[str]:
        return ["make-examples", "--input", str(big_text), "--output", str(out / "shard-00000.tfrecord"),
                "--vocab-file", str(sample / "vocab.txt"), "--dupe-factor", "3"]

    run_cli(*args(tmp_path / "ref"), check=True)
    interrupted = _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref")
    assert interrupted >= 2, "the kills should land while the step is still working"


def test_extract(sample_dump, tmp_path):
    def args(out: Path) -> list[str]:
        return ["extract", "--input", str(sample_dump), "--output", str(out)]

    run_cli(*args(tmp_path / "ref"), check=True)
    assert _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref") >= 1


def test_build_corpus(corpus, tmp_path):
    articles = tmp_path / "articles"
    articles.mkdir()
    for i in range(4):  # four parts, so the step runs long enough to be caught mid-way
        shutil.copyfile(corpus / "articles" / "part-00000.jsonl.gz", articles / f"part-{i:05d}.jsonl.gz")
    def args(out: Path) -> list[str]:
        return ["build-corpus", "--input", str(articles), "--output", str(out),
                "--train-shards", "3", "--heldout-shards", "1"]

    run_cli(*args(tmp_path / "ref"), check=True)
    interrupted = _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref",
                                         delays=(0.2, 0.35, 0.5, 0.65))
    assert interrupted >= 1


def test_fetch_dump(sample, tmp_path):
    def args(out: Path) -> list[str]:
        return ["fetch-dump", "--wiki", "enwiki", "--mirror", str(sample / "mirror"), "--output", str(out)]

    env = {"BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    run_cli(*args(tmp_path / "ref"), env=env, check=True)
    _check_kill_and_resume(args(tmp_path / "out"), tmp_path / "out", tmp_path / "ref", env)
