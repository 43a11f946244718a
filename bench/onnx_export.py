"""ONNX export routes for the student: the platform's graph builder against tf2onnx from the SavedModel.

    python bench/onnx_export.py [--run data/runs/enwiki-20160101]
    (tf2onnx is not a dependency: pip install tf2onnx==1.17.0 to time it; without it only the
    builder is timed)

For the newest student `make demo` left, each route's wall seconds, file size and largest
masked-LM logit difference from the TensorFlow student on one batch of 8 x 64 random tokens
(logits at every position). What it printed decided onnx_model.py's route (docs/steps.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "data" / "runs" / "enwiki-20160101")
    args = parser.parse_args()

    import tensorflow as tf

    from bertdistill import onnx_model
    from bertdistill.bert.checkpoints import load_teacher
    from bertdistill.bert.model import Bert

    exports = sorted(args.run.glob("students/*/export/model.safetensors"), key=lambda p: p.stat().st_mtime)
    if not exports:
        raise SystemExit(f"no student in {args.run}: run `make demo` first")
    config, weights, _ = load_teacher(exports[-1].parent, "student")
    model = Bert(config)
    model.assign(weights)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 29000, (8, 64))
    ones, zeros, every = np.ones_like(ids), np.zeros_like(ids), np.tile(np.arange(64), (8, 1))
    reference = model.mlm_logits(model.encode(*(tf.constant(a, tf.int32) for a in (ids, ones, zeros))),
                                 tf.constant(every, tf.int32)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        onnx_model.save(onnx_model.build(config, weights), Path(tmp) / "built.onnx")
        seconds = time.perf_counter() - started
        logits = onnx_model.session(Path(tmp) / "built.onnx").run(["mlm_logits"], onnx_model.feeds(
            ids, ones, zeros, every))[0]
        print(f"builder (onnx_model.build): {seconds:6.1f} s, {(Path(tmp) / 'built.onnx').stat().st_size / 1e6:.1f} "
              f"MB, max |logit - TensorFlow| {np.abs(logits - reference).max():.2e}")
        try:
            import tf2onnx
        except ImportError:
            print("tf2onnx: not installed (pip install tf2onnx==1.17.0 to compare)")
            return
        from bertdistill.steps.publish import export_savedmodel

        saved = Path(tmp) / "savedmodel"
        export_savedmodel(config, weights, saved)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--output",
                        f"{tmp}/tf2onnx.onnx", "--opset", "17"], check=True, capture_output=True)
        seconds = time.perf_counter() - started
        import onnxruntime as ort

        session = ort.InferenceSession(f"{tmp}/tf2onnx.onnx", providers=["CPUExecutionProvider"])
        out = session.run(["mlm_logits"], {"input_ids": ids.astype(np.int32), "input_mask": ones.astype(np.int32),
                                           "segment_ids": zeros.astype(np.int32)})[0]
        print(f"tf2onnx {tf2onnx.__version__} (SavedModel): {seconds:6.1f} s, "
              f"{Path(f'{tmp}/tf2onnx.onnx').stat().st_size / 1e6:.1f} MB, max |logit - TensorFlow| "
              f"{np.abs(out - reference).max():.2e}")


if __name__ == "__main__":
    main()
