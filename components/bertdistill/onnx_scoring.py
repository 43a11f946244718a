"""The student's ONNX exports as evaluate judges them: made, held to the student's own logits,
scored and told which one the registry serves.

An export is only worth shipping if it is the student: fp32 must reproduce the TensorFlow
logits within ONNX_TOLERANCE (else evaluate fails and nothing is written), and int8 is served
when it loses at most INT8_BOUND_POINTS of fp32's held-out top-1 (per-channel quantisation lost
0.06 points on the demo student, per-tensor 0.47).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertdistill.errors import StepError

ONNX_TOLERANCE = 1e-4  # largest logit difference an ONNX export may have from the student
INT8_BOUND_POINTS = 0.5  # int8 is served when its held-out top-1 is at most this far below fp32's


def export_onnx(config, weights, folder: Path) -> dict[str, Path]:
    """The student as ONNX fp32 and int8 (onnx_model.py), in `folder`: precision -> file."""
    from bertdistill import onnx_model

    folder.mkdir(parents=True, exist_ok=True)
    files = {"fp32": folder / onnx_model.FP32, "int8": folder / onnx_model.INT8}
    onnx_model.save(onnx_model.build(config, weights), files["fp32"])
    onnx_model.quantize(files["fp32"], files["int8"])
    return files


def onnx_parity(model, session, batch, feeds: dict) -> float:
    """Largest |ONNX fp32 - TensorFlow| masked-LM or next-sentence logit on one held-out batch (its
    ONNX `feeds`); refused above ONNX_TOLERANCE."""
    sequence = model.encode(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    mlm = model.mlm_logits(sequence, batch["masked_lm_positions"]).numpy()
    nsp = model.nsp_logits(sequence).numpy()
    theirs_mlm, theirs_nsp = session.run(None, feeds)
    real = batch["masked_lm_weights"].numpy() > 0
    parity = float(max(np.abs(mlm - theirs_mlm)[real].max(), np.abs(nsp - theirs_nsp).max()))
    if parity > ONNX_TOLERANCE:
        raise StepError(f"the student's ONNX export differs from it by {parity:.2g} in a logit (more than "
                        f"{ONNX_TOLERANCE}); not written")
    return parity


def onnx_report(col: dict[str, np.ndarray], parity: float, files: dict[str, Path], timed: dict[str, dict]) -> dict:
    """The exports' held-out top-1 (`col`: evaluate's columns), size and speed (`timed`: precision ->
    latency figures), and which of them the registry should serve."""
    y = col["labels"]
    out: dict = {}
    for precision, path in files.items():
        top1 = col[f"onnx_{precision}_top1"]
        out[precision] = {"mlm_accuracy": float((top1 == y).mean()), "bytes": path.stat().st_size, **timed[precision]}
    out["fp32"]["max_abs_logit_diff_vs_tensorflow"] = parity
    out["int8"]["agreement_with_fp32"] = float((col["onnx_int8_top1"] == col["onnx_fp32_top1"]).mean())
    out["int8_minus_fp32_points"] = (out["int8"]["mlm_accuracy"] - out["fp32"]["mlm_accuracy"]) * 100
    out["serves"] = "int8" if out["int8_minus_fp32_points"] >= -INT8_BOUND_POINTS else "fp32"
    return out
