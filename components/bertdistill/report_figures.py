"""The figures and words of evaluate's report that need no model: the paired gain with its
bootstrap interval, calibration error, the verdicts a person reads first, and the headline
figures the pipeline's MLflow run shows. numpy only, so bench/ and tests use them without
TensorFlow.
"""

from __future__ import annotations

import numpy as np


def paired_gain(student_correct: np.ndarray, control_correct: np.ndarray, resamples: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """Student minus control top-1 accuracy, with a paired bootstrap 95% interval over positions."""
    diff = student_correct.astype(np.float64) - control_correct.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(0, resamples, 100):
        rows = min(100, resamples - i)
        means[i : i + rows] = diff[rng.integers(0, len(diff), (rows, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted."""
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / max(len(confidence), 1))


def verdict(report: dict) -> str:
    """What the figures say, in words: the sentence a user reads first."""
    s, t = report["student"]["mlm_accuracy"], report["teacher"]["mlm_accuracy"]
    if "distillation_gain" not in report:
        return (f"The student reaches {s:.1%} held-out top-1 against the teacher's {t:.1%}; no no-teacher control "
                "was trained, so what the teacher added is not measured.")
    c = report["control"]["mlm_accuracy"]
    g = report["distillation_gain"]
    interval = f"{g['mlm_accuracy'] * 100:+.1f} points (95% interval {g['ci95_low'] * 100:+.1f} to " \
               f"{g['ci95_high'] * 100:+.1f})"
    if g["ci95_low"] > 0:
        words = (f"Distillation helped: the student beats its no-teacher control (the same student trained "
                 f"without the teacher) by {interval}.")
    elif g["ci95_high"] < 0:
        words = (f"Distillation hurt: the student trails its no-teacher control (the same student trained "
                 f"without the teacher) by {interval}.")
    else:
        words = f"No measurable gain from the teacher: the student differs from its no-teacher control by {interval}."
    if t < c:
        words += (f" The teacher ({t:.1%}) is weaker than the control ({c:.1%}): it pulls the student towards a "
                  "worse model; adapt it longer or distil from a stronger one.")
    return words


def temporal_verdict(temporal: dict) -> str:
    """Whether this month taught the student what changed: its top-1 on the temporal held-out
    against last month's champion's, in words, by the interval of the paired gain."""
    s = temporal["student"]["mlm_accuracy"]
    where = (f"On the {temporal['positions']:,} masked positions of articles new or changed since last month "
             "(held out of training)")
    if "champion" not in temporal:
        return f"{where} the student scores {s:.1%}; no champion was scored there."
    c, g = temporal["champion"]["mlm_accuracy"], temporal["gain_over_champion"]
    words = ("learnt what changed better than" if g["ci95_low"] > 0 else "knows what changed less well than"
             if g["ci95_high"] < 0 else "is not measurably better on what changed than")
    return f"{where}, the student ({s:.1%}) {words} last month's champion ({c:.1%})."


def headline(report: dict) -> dict[str, float]:
    """The figures the pipeline's MLflow parent run shows."""
    out = {"student_mlm_accuracy": report["student"]["mlm_accuracy"],
           "teacher_mlm_accuracy": report["teacher"]["mlm_accuracy"],
           "student_over_teacher": report["student_over_teacher"], "speedup_encoder": report["speedup_encoder"],
           "student_mlm_calibration_error": report["student"]["mlm_calibration_error"],
           "baseline_mlm_accuracy": report["baseline"]["mlm_accuracy"],
           "student_parameters": report["student"]["parameters"], "teacher_parameters": report["teacher"]["parameters"]}
    if "distillation_gain" in report:
        out |= {"control_mlm_accuracy": report["control"]["mlm_accuracy"],
                "distillation_gain": report["distillation_gain"]["mlm_accuracy"],
                "distillation_gain_ci95_low": report["distillation_gain"]["ci95_low"],
                "distillation_gain_ci95_high": report["distillation_gain"]["ci95_high"]}
    temporal = report.get("temporal", {})
    out |= {f"temporal_{role}_mlm_accuracy": temporal[role]["mlm_accuracy"]
            for role in ("student", "control", "teacher", "champion") if role in temporal}
    return out
