"""Serving speed: the teacher and the student in every form the student is published in, side by side.

    python bench/serving.py [--run data/runs/enwiki-20160101] [--rounds 40] [--requests 200] [--no-http]

Models: the adapted teacher in TensorFlow; the student in TensorFlow, ONNX Runtime fp32 and ONNX
Runtime int8 (the files publish wrote, else built here the same way). The work is a fill-mask
request's: the encoder and the masked-LM head at one [MASK] per sequence. Measured:
- latency at batch 1, 64 and 128 tokens: p50 and p95 over the rounds;
- throughput at batch 32, 64 tokens: sequences per second at the median, and x the teacher.
Every round times each model once, in turn, so a busy spell of a shared machine falls on all.
Then `mlflow models serve` of the registered champion (make demo's MLflow store), 200 HTTP
requests of one probe each, p50 and p95: what a caller of the served model waits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Between two timed calls: the thread pools of the runtime just timed spin for a while after a call,
# on the same 2 cores; without the pause ONNX Runtime int8 measured 83-93 ms a batch of 32 after a
# TensorFlow call, and 47 ms on its own.
PAUSE_S = 0.2
WARMUP_CALLS = 10  # ONNX Runtime grows its memory arena over the first calls of a shape


def newest(paths: list[Path], what: str) -> Path:
    if not paths:
        raise SystemExit(f"no {what} found: run `make demo` first")
    return max(paths, key=lambda p: p.stat().st_mtime)


def tf_call(config, weights, ids, mask, seg, pos):
    import tensorflow as tf

    from bertdistill.bert.model import Bert

    model = Bert(config)
    model.assign(weights)
    inputs = [tf.constant(a, tf.int32) for a in (ids, mask, seg, pos)]
    fn = tf.function(lambda: model.mlm_logits(model.encode(*inputs[:3]), inputs[3]))
    return lambda: fn().numpy()


def ort_call(session, ids, mask, seg, pos):
    from bertdistill.onnx_model import feeds

    inputs = feeds(ids, mask, seg, pos)
    return lambda: session.run(["mlm_logits"], inputs)


def timed(calls: dict, rounds: int) -> dict[str, np.ndarray]:
    from bertdistill.timing import take_turns

    seconds = take_turns(calls, rounds, warmup=WARMUP_CALLS, pause_s=PAUSE_S)
    return {name: np.array(values) for name, values in seconds.items()}


def http_latency(requests: int) -> tuple[float, float] | None:
    """p50, p95 seconds of `mlflow models serve` answering one probe, for the demo's champion."""
    from mlflow import MlflowClient

    from bertdistill.orchestration.settings import Settings
    from bertdistill.orchestration.summary import PROBES

    uri = Settings.load().tracking_uri()
    models = MlflowClient(tracking_uri=uri).search_registered_models(order_by=["last_updated_timestamp DESC"])
    models = [m for m in models if not m.name.endswith("-promotion-lock") and "champion" in m.aliases]
    if not models:
        print(f"no champion registered in {uri}: HTTP latency not measured")
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{models[0].name}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from bertdistill.orchestration.mlflow_server import wait_healthy

        wait_healthy(f"http://127.0.0.1:{port}/ping", timeout_s=180, server=server)
        seconds = []
        for i in range(requests + 5):
            body = json.dumps({"inputs": {"text": [PROBES[i % len(PROBES)]]}, "params": {"top_k": 5}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as r:
                r.read()
            if i >= 5:  # the first requests warm the server up
                seconds.append(time.perf_counter() - started)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    print(f"served model: {models[0].name}@champion ({models[0].aliases['champion']}), {requests} requests")
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "data" / "runs" / "enwiki-20160101")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-http", action="store_true", help="skip mlflow models serve")
    args = parser.parse_args()

    from bertdistill import onnx_model
    from bertdistill.bert.checkpoints import load_teacher

    student = newest([p.parent for p in args.run.glob("students/*/export/model.safetensors")], "student").parent
    teacher = newest([p.parent for p in args.run.glob("teachers/**/model.safetensors")
                      if "huggingface" not in p.parts], "adapted teacher")
    s_config, s_weights, _ = load_teacher(student / "export", "student")
    t_config, t_weights, _ = load_teacher(teacher, "teacher")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = student / "published" / "onnx"
        if not (onnx_dir / onnx_model.INT8).exists():
            onnx_dir = Path(tmp)
            onnx_model.save(onnx_model.build(s_config, s_weights), onnx_dir / onnx_model.FP32)
            onnx_model.quantize(onnx_dir / onnx_model.FP32, onnx_dir / onnx_model.INT8)
        sessions = {p: onnx_model.session(onnx_dir / f) for p, f in (("fp32", onnx_model.FP32),
                                                                     ("int8", onnx_model.INT8))}
        print(f"teacher {teacher.relative_to(ROOT) if teacher.is_relative_to(ROOT) else teacher}: "
              f"{t_config.num_hidden_layers} layers; student {student.name}: {s_config.num_hidden_layers} layers; "
              f"{len(os.sched_getaffinity(0))} cores; {args.rounds} alternated rounds")
        rng = np.random.default_rng(0)
        rows: dict[str, dict[str, str]] = {}
        for label, batch, length in (("batch 1, 64 tokens", 1, 64), ("batch 1, 128 tokens", 1, 128),
                                     ("batch 32, 64 tokens", 32, 64)):
            ids = rng.integers(1000, 29000, (batch, length))
            mask, seg, pos = np.ones_like(ids), np.zeros_like(ids), np.full((batch, 1), length // 2)
            calls = {"teacher, TensorFlow": tf_call(t_config, t_weights, ids, mask, seg, pos),
                     "student, TensorFlow": tf_call(s_config, s_weights, ids, mask, seg, pos),
                     "student, ONNX fp32": ort_call(sessions["fp32"], ids, mask, seg, pos),
                     "student, ONNX int8": ort_call(sessions["int8"], ids, mask, seg, pos)}
            seconds = timed(calls, args.rounds)
            base = np.median(seconds["teacher, TensorFlow"])
            for name, values in seconds.items():
                p50, p95 = np.percentile(values, 50), np.percentile(values, 95)
                if batch == 1:
                    rows.setdefault(name, {})[label] = f"{p50 * 1000:6.1f} / {p95 * 1000:6.1f}"
                else:
                    rows.setdefault(name, {})[label] = f"{batch / p50:7.1f} seq/s  {base / p50:5.2f}x"
        labels = ["batch 1, 64 tokens", "batch 1, 128 tokens", "batch 32, 64 tokens"]
        print(f"\n{'model':22s} | {'p50 / p95 ms, ' + labels[0]:>28s} | {'p50 / p95 ms, ' + labels[1]:>29s} | "
              f"throughput, {labels[2]} (x teacher)")
        for name, cells in rows.items():
            print(f"{name:22s} | {cells[labels[0]]:>28s} | {cells[labels[1]]:>29s} | {cells[labels[2]]}")
        sizes = {p: (onnx_dir / f).stat().st_size / 1e6 for p, f in (("fp32", onnx_model.FP32),
                                                                   ("int8", onnx_model.INT8))}
        print(f"ONNX files: fp32 {sizes['fp32']:.1f} MB, int8 {sizes['int8']:.1f} MB")
    if not args.no_http:
        figures = http_latency(args.requests)
        if figures:
            print(f"mlflow models serve over HTTP: p50 {figures[0] * 1000:.1f} ms, p95 {figures[1] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
