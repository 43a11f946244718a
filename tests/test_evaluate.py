"""evaluate's statistics: the distillation gain's interval, calibration and the verdict in words."""

from __future__ import annotations

import numpy as np

from bertdistill.steps.evaluate import calibration_error, paired_gain, verdict


def test_the_gain_interval_covers_the_true_gain_and_excludes_zero_only_when_it_should():
    rng = np.random.default_rng(0)
    control = rng.random(20_000) < 0.25
    better = control | (rng.random(20_000) < 0.02)  # about +1.5 points, paired
    gain, low, high = paired_gain(better, control)
    assert abs(gain - (better.mean() - control.mean())) < 1e-12
    assert 0 < low < gain < high < 0.03
    same, low, high = paired_gain(control, control)
    assert same == low == high == 0.0
    noise = rng.random(20_000) < 0.25  # unrelated, same rate: the interval straddles 0
    _, low, high = paired_gain(noise, control)
    assert low < 0 < high


def test_calibration_error_is_small_when_confidence_matches_accuracy_and_large_when_not():
    rng = np.random.default_rng(1)
    confidence = rng.random(50_000)
    calibrated = rng.random(50_000) < confidence
    assert calibration_error(confidence, calibrated) < 0.01
    overconfident = rng.random(50_000) < confidence / 2
    assert 0.2 < calibration_error(confidence, overconfident) < 0.3


def test_the_verdict_names_a_teacher_weaker_than_the_control():
    report = {"student": {"mlm_accuracy": 0.253}, "teacher": {"mlm_accuracy": 0.199},
              "control": {"mlm_accuracy": 0.260},
              "distillation_gain": {"mlm_accuracy": -0.007, "ci95_low": -0.015, "ci95_high": 0.001}}
    words = verdict(report)
    assert words.startswith("No measurable gain from the teacher")
    assert "-0.7 points (95% interval -1.5 to +0.1)" in words
    assert "The teacher (19.9%) is weaker than the control (26.0%)" in words
    report["teacher"]["mlm_accuracy"] = 0.30
    report["distillation_gain"] = {"mlm_accuracy": 0.012, "ci95_low": 0.004, "ci95_high": 0.02}
    assert verdict(report).startswith("Distillation helped") and "weaker" not in verdict(report)
    assert "no-teacher control" in verdict(report)
    report["distillation_gain"] = {"mlm_accuracy": -0.012, "ci95_low": -0.02, "ci95_high": -0.004}
    assert verdict(report).startswith("Distillation hurt") and "no-teacher control" in verdict(report)
    del report["distillation_gain"]
    assert "no no-teacher control was trained" in verdict(report)
