"""distill under real `horovodrun -np 2 --gloo` processes on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HOROVODRUN = shutil.which("horovodrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(HOROVODRUN is None, reason="horovod is not installed (make install builds it)")


def _distill(teacher, labels, out, ranks: int, threads: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bertdistill.cli", "distill", "--teacher", str(teacher), "--labels", str(labels),
               "--output", str(out), "--student-layers", "1", "--steps", "4", "--batch-size", "8",
               "--grad-accum", "2", "--checkpoint-every", "2", "--warmup-steps", "1", "--threads", str(threads),
               "--lr-scaling", "linear"]
    if ranks > 1:
        command = [HOROVODRUN, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_two_ranks_stay_identical_read_disjoint_shards_and_match_one_rank(tmp_path, tiny_teacher, two_label_shards):
    two = _distill(tiny_teacher, two_label_shards, tmp_path / "two", 2, 1)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _distill(tiny_teacher, two_label_shards, tmp_path / "one", 1, 2)
    assert one.returncode == 0, one.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "_MANIFEST.json").read_text())["summary"]
    s1 = json.loads((tmp_path / "one" / "_MANIFEST.json").read_text())["summary"]
    assert s2["ranks"] == 2 and len(set(s2["weights_sha256_per_rank"])) == 1, "ranks diverged"
    a, b = s2["shards_per_rank"]
    assert a and b and not set(a) & set(b) and len(a) + len(b) == 2
    # Same global batch (2 micro-batches of 8), same data per micro-batch, and so the same (linearly
    # scaled) learning rate: the loss curves agree up to float summation order, 1e-4 relative per step.
    np.testing.assert_allclose(s2["losses"], s1["losses"], rtol=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "ckpt-0000002.safetensors").stat().st_size > 0  # rank 0 wrote it


def test_fewer_shards_than_ranks_is_a_clear_error(tmp_path, tiny_teacher, two_label_shards):
    one_shard = tmp_path / "labels"
    (one_shard / "train").mkdir(parents=True)
    for f in (two_label_shards / "train").glob("*shard-00000*"):
        shutil.copyfile(f, one_shard / "train" / f.name)
    proc = _distill(tiny_teacher, one_shard, tmp_path / "out", 2, 1)
    assert proc.returncode != 0
    assert "1 labelled train shard(s) for 2 micro-batches per step over 2 rank(s)" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "_MANIFEST.json").exists()
