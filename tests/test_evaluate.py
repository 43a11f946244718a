"""evaluate's statistics: the distillation gain's interval, calibration, the verdict in words, the figure."""

from __future__ import annotations

import numpy as np
import pytest

from bertdistill.report_chart import chart, figure
from bertdistill.report_figures import calibration_error, paired_gain, verdict


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


def _scores(accuracy: float, layers: int = 3, parameters: float = 20e6) -> dict:
    return {"mlm_accuracy": accuracy, "mlm_accuracy_outside_top10": accuracy / 2, "agreement_with_teacher": 0.5,
            "layers": layers, "parameters": parameters, "latency_encoder_s": 0.1, "latency_mlm_s": 0.15}


def _report() -> dict:
    """A report as evaluate writes it, with a control, and the champion it scored (version 4)."""
    return {"positions": 12_345, "student": _scores(0.253), "teacher": _scores(0.30, 6, 40e6),
            "control": _scores(0.24), "baseline": {"mlm_accuracy": 0.05, "mlm_accuracy_outside_top10": 0.0,
                                                   "agreement_with_teacher": 0.1},
            "champion": {**_scores(0.243), "version": 4}, "speedup_encoder": 2.0,
            "distillation_gain": {"mlm_accuracy": 0.013, "ci95_low": 0.004, "ci95_high": 0.021},
            "gain_over_champion": {"mlm_accuracy": 0.010, "ci95_low": -0.002, "ci95_high": 0.019}}


def _bars(fig) -> dict[str, list[float]]:
    return {bars.get_label(): [bar.get_height() for bar in bars] for bars in fig.axes[0].containers}


def test_the_report_figure_shows_the_champion_beside_student_control_and_teacher(tmp_path):
    import matplotlib.pyplot as plt

    fig = figure(_report())
    bars = _bars(fig)
    assert set(bars) == {"baseline", "control (no teacher)", "champion (version 4)", "student", "teacher"}
    assert bars["champion (version 4)"] == pytest.approx([0.243, 0.1215, 0.5])
    assert bars["student"] == pytest.approx([0.253, 0.1265, 0.5])
    assert "champion (version 4)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    title = fig.axes[0].get_title()
    assert "gain over control +1.3 points" in title and "gain over champion +1.0 points (95% CI -0.2 to +1.9)" in title
    plt.close(fig)
    without = _report()
    del without["champion"], without["gain_over_champion"]  # no champion yet, or one on another vocab
    fig = figure(without)
    assert not [label for label in _bars(fig) if "champion" in label] and "champion" not in fig.axes[0].get_title()
    plt.close(fig)
    chart(_report(), tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
