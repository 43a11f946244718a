"""distill: trains on cached labels, resumes exactly, stops on NaN, refuses mismatched labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import distill_args, error_lines, run_cli

pytest.importorskip("tensorflow")


def _summary(out):
    return json.loads((out / "_MANIFEST.json").read_text())["summary"]


def test_trains_and_exports_the_student(tiny_student):
    summary = _summary(tiny_student)
    assert len(summary["losses"]) == 6 and all(np.isfinite(summary["losses"]))
    assert summary["student_layers"] == 1 and summary["resumed_from"] == 0
    config = json.loads((tiny_student / "export" / "bert_config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 30522
    assert (tiny_student / "export" / "model.safetensors").stat().st_size > 1_000_000
    # none after the last step (the export follows at once)
    assert sorted(p.name for p in (tiny_student / "checkpoints").iterdir()) == ["ckpt-0000003.safetensors",
                                                                                "latest.json"]
    params = json.loads((tiny_student / "_MANIFEST.json").read_text())["params"]
    assert params["warmup_steps"] == 2 and "warmup_fraction" not in params  # the warm-up as it ran, in steps


def test_a_resumed_run_continues_the_same_loss_curve(tmp_path, tiny_teacher, labels_dir, tiny_student):
    """As if killed after the step-3 checkpoint: drop what came later, rerun, compare."""
    out = tmp_path / "student"
    shutil.copytree(tiny_student, out)
    (out / "_MANIFEST.json").unlink()
    shutil.rmtree(out / "export")
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    run_cli(*distill_args(tiny_teacher, labels_dir, out), check=True)
    resumed, uninterrupted = _summary(out), _summary(tiny_student)
    assert resumed["resumed_from"] == 3
    np.testing.assert_allclose(resumed["losses"], uninterrupted["losses"], rtol=1e-5)


def test_only_the_latest_checkpoint_is_kept(tmp_path, tiny_teacher, labels_dir, tiny_student):
    """Those of other parameters (a step-3 one, every 3 steps) and the run's own earlier ones go once
    the new one is committed: a rerun reads only latest.json's."""
    out = tmp_path / "student"
    shutil.copytree(tiny_student / "checkpoints", out / "checkpoints")
    run_cli(*distill_args(tiny_teacher, labels_dir, out, "--checkpoint-every", "1"), check=True)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 5 and latest["params"]["checkpoint_every"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [Path(latest["file"]).name, "latest.json"]


def test_a_nan_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_teacher, labels_dir):
    out = tmp_path / "student"
    proc = run_cli(*distill_args(tiny_teacher, labels_dir, out, "--learning-rate", "1e30", "--checkpoint-every", "1",
                          "--warmup-steps", "0"))
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert "the loss became" in line and "at step" in line and "last good checkpoint" in line
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert (out / latest["file"]).exists() and not (out / "_MANIFEST.json").exists()


def test_labels_with_another_k_are_refused(tmp_path, tiny_teacher, labels_dir):
    proc = run_cli(*distill_args(tiny_teacher, labels_dir, tmp_path / "s", "--top-k", "5"))
    assert proc.returncode == 2 and "top-10 labels but top-5" in error_lines(proc)[0]


def test_evaluate_reports_student_control_teacher_and_baseline(tmp_path, tiny_teacher, labels_dir, labelled,
                                                               tiny_student):
    control = tmp_path / "control"
    run_cli(*distill_args(tiny_teacher, labels_dir, control, "--soft-mlm-weight", "0", "--soft-nsp-weight", "0"),
            check=True)
    out = tmp_path / "report"
    proc = run_cli("evaluate", "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--heldout",
                   str(labelled.parent), "--output", str(out), "--control", str(control), "--max-examples", "512",
                   "--latency-batch", "4", "--temporal", str(labelled.parent), check=True)
    assert "most-frequent-token baseline" in proc.stdout and "vs control" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    # The temporal pass, given the held-out shards themselves, scores every model as the main pass did.
    temporal = report["temporal"]
    assert temporal["positions"] == report["positions"] and "no champion was scored there" in temporal["verdict"]
    for who in ("student", "control", "teacher"):
        assert temporal[who]["mlm_accuracy"] == pytest.approx(report[who]["mlm_accuracy"])
    assert temporal["distillation_gain"] == pytest.approx(report["distillation_gain"])
    assert temporal["verdict"] in proc.stdout
    assert report["positions"] > 5000 and report["examples"] >= 512
    for who in ("student", "control", "teacher", "baseline"):
        assert 0 <= report[who]["mlm_accuracy"] <= 1
    for who in ("student", "control", "teacher"):
        assert 0 <= report[who]["mlm_calibration_error"] <= 1
    gain = report["distillation_gain"]
    assert gain["mlm_accuracy"] == pytest.approx(report["student"]["mlm_accuracy"] - report["control"]["mlm_accuracy"])
    assert gain["ci95_low"] <= gain["mlm_accuracy"] <= gain["ci95_high"]
    assert report["verdict"] in proc.stdout and "no-teacher control" in report["verdict"]
    # The control learnt nothing from the teacher: it matches the teacher's distribution no better.
    assert report["control"]["kl_from_teacher"] > report["student"]["kl_from_teacher"]
    # The baseline always answers the most frequent held-out token; it cannot beat its own share.
    assert 0.02 < report["baseline"]["mlm_accuracy"] < 0.2
    assert report["baseline"]["mlm_accuracy_outside_top10"] == 0.0
    assert report["student"]["layers"] == 1 and report["student"]["kl_from_teacher"] >= 0
    assert report["teacher"]["latency_encoder_s"] > 0 and report["speedup_encoder"] > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_warm_start_begins_from_the_published_student(tmp_path, tiny_teacher, labels_dir, labelled,
                                                        tiny_student):
    """--init-from: the student starts as last month's (at learning rate 0 it stays that model to the bit)
    and its first loss is where that model ended, not where a cold start begins. With --fresh it also
    reads that labelled shard (the month's new and changed articles), an input of its manifest."""
    from safetensors.numpy import load_file

    out = tmp_path / "warm"
    run_cli(*distill_args(tiny_teacher, labels_dir, out, "--init-from", str(tiny_student), "--learning-rate", "0",
                          "--steps", "2", "--checkpoint-every", "2", "--warmup-steps", "1", "--fresh",
                          str(labelled.parent), "--fresh-share", "0.4"), check=True)
    before, after = (load_file(str(s / "export" / "model.safetensors")) for s in (tiny_student, out))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    warm, cold = _summary(out), _summary(tiny_student)
    assert warm["losses"][0] < cold["losses"][0]
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert manifest["inputs"]["init_from"].split()[0].endswith("export")  # its content hash beside it
    assert manifest["inputs"]["fresh"].split()[0] == str(labelled.parent) and warm["fresh_share"] == 0.4


def test_a_fresh_share_of_one_is_refused(tmp_path, tiny_teacher, labels_dir, labelled):
    proc = run_cli(*distill_args(tiny_teacher, labels_dir, tmp_path / "s", "--fresh", str(labelled.parent),
                                 "--fresh-share", "1"))
    assert proc.returncode == 2 and "--fresh-share must be at least 0 and below 1" in error_lines(proc)[0]


def test_a_warm_start_from_another_shape_is_refused(tmp_path, tiny_teacher, labels_dir, tiny_student):
    out = tmp_path / "warm"
    proc = run_cli(*distill_args(tiny_teacher, labels_dir, out, "--init-from", str(tiny_student), "--student-layers",
                                 "2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = error_lines(proc)
    assert "is not this student's shape (num_hidden_layers 1 there, 2 here)" in line and "start cold" in line
    assert not (out / "_MANIFEST.json").exists()
