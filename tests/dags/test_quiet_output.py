"""What a person reads stays free of library noise: `make demo`'s summary shows no MLflow warnings or
TensorFlow C++ notices, and the local operator's task logs carry one timestamp a line and no progress
bars, in the local mode and, for the progress bars, in pods too."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from bertdistill.orchestration import summary
from bertdistill.orchestration.settings import Settings

NOISE = ("UserWarning", "oneDNN", "cpu_feature_guard", "Add type hints", "TF_ENABLE_ONEDNN_OPTS")
PROGRESS_OFF = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "TQDM_DISABLE": "1"}

# A stand-in for the fill-mask pyfunc, small enough to log here: no type hints (MLflow warns when the
# class is defined, i.e. as the summary loads it) and TensorFlow imported on load and run on predict
# (its C++ logging prints the oneDNN notice at import and the CPU-feature one at the first operation).
STUB_MODEL = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Stub(PythonModel):
    def load_context(self, context):
        import tensorflow as tf

        self.tf = tf

    def predict(self, context, model_input, params=None):
        top_k = int((params or {}).get("top_k", 3))
        p = float(self.tf.constant([0.25]).numpy()[0] + 0.25)
        return [{"text": t, "masks": [[{"token": "word", "probability": p}] * top_k]} for t in model_input["text"]]


mlflow.models.set_model(Stub())
'''
REPORT = {"student": {"mlm_accuracy": 0.3, "layers": 1, "parameters": 1e6}, "teacher": {"mlm_accuracy": 0.5},
          "control": {"mlm_accuracy": 0.2}, "baseline": {"mlm_accuracy": 0.05}, "student_over_teacher": 0.6,
          "speedup_encoder": 3.0, "verdict": "stub verdict"}


def _publish_stub(store: Path) -> None:
    """A store as publish leaves it, with the stub as champion: a run with report.json and its model."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    uri = Settings(store=str(store)).tracking_uri()
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("bertdistill", artifact_location=(store / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_dict(run.info.run_id, REPORT, "report.json")
    code = store / "stub_model.py"
    code.write_text(STUB_MODEL)
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                               params=ParamSchema([ParamSpec("top_k", "long", 5)]))
    with warnings.catch_warnings(record=True):  # the very warning the summary must not show
        # pip_requirements given: MLflow would otherwise load the model in a child process to infer them
        mlflow.pyfunc.save_model(store / "model", python_model=str(code), signature=signature,
                                 pip_requirements=["mlflow"])
    client.log_artifacts(run.info.run_id, str(store / "model"), "model")
    name = "bertdistill-stub"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    client.set_tag(run.info.run_id, "bertdistill.model_version", f"models:/{name}/{version.version}")
    client.set_terminated(run.info.run_id)


@pytest.mark.slow
def test_the_summary_shows_no_library_warnings_or_tensorflow_notices(tmp_path):
    """The whole `python -m bertdistill.orchestration.summary`, as `make demo` runs it last."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("mlflow")
    _publish_stub(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in summary.QUIET_ENV and not k.startswith("BERTDISTILL_")}
    proc = subprocess.run([sys.executable, "-m", "bertdistill.orchestration.summary"], capture_output=True, text=True,
                          env={**env, "BERTDISTILL_STORE": str(tmp_path)}, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "registered model:  bertdistill-stub version 1 (alias champion)" in proc.stdout
    assert "paris is the capital of [MASK].          word 0.50, word 0.50, word 0.50" in proc.stdout
    assert [n for n in NOISE if n in out] == [], out
    assert proc.stderr.strip() == ""


def test_quiet_sets_the_environment_tensorflow_and_mlflow_read_at_import(monkeypatch):
    for name in summary.QUIET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # a person debugging keeps what they asked for
    monkeypatch.setattr(sys, "warnoptions", [])
    tf_logger = logging.getLogger("tensorflow")
    monkeypatch.setattr(tf_logger, "level", tf_logger.level)
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
        summary.quiet()
        warnings.warn("an ordinary library warning", UserWarning, stacklevel=1)
        with warnings.catch_warnings():  # as MLflow shows its "Add type hints" warning, whatever our filters
            warnings.simplefilter("once", category=UserWarning)
            warnings.warn("Add type hints to the `predict` method", UserWarning, stacklevel=1)
    assert shown == []
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "ERROR"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert summary.QUIET_ENV["TF_CPP_MIN_LOG_LEVEL"] == "2"  # 3 would hide TensorFlow's errors too
    assert tf_logger.getEffectiveLevel() == logging.ERROR


@pytest.mark.parametrize(("child", "relayed"), [
    ("2026-11-26 13:34:19,407 INFO bertdistill.steps.adapt_teacher: adapt-teacher: 1 steps\n",
     "INFO bertdistill.steps.adapt_teacher: adapt-teacher: 1 steps"),
    ("2026-11-26 13:34:19.407123: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on.\n",
     "I tensorflow/core/util/port.cc:153] oneDNN custom operations are on."),
    ("[1]<stderr>:2026-11-26 13:34:19,407 INFO bertdistill.steps.distill: step 10\n",
     "[1]<stderr>:INFO bertdistill.steps.distill: step 10"),
    ("Downloading:  50%|#    | 1/2\rDownloading: 100%|#####| 2/2\r\n", "Downloading: 100%|#####| 2/2"),
    ("distill: 200 steps -> data/students/x (logged at 2026-11-26 13:34:19,407)\n",
     "distill: 200 steps -> data/students/x (logged at 2026-11-26 13:34:19,407)"),
])
def test_a_relayed_line_keeps_one_timestamp_and_a_progress_bar_its_last_state(child, relayed):
    pytest.importorskip("airflow")
    from bertdistill.orchestration.local import relayed as relay

    assert relay(child) == relayed


def test_the_local_operator_gives_the_task_log_the_step_lines_once_stamped_without_progress_bars(monkeypatch):
    """A child that logs as `bertdistill` does (cli.py's format) and draws a bar if its env lets it."""
    pytest.importorskip("airflow")
    from bertdistill.orchestration import local

    child = textwrap.dedent("""
        import logging, os, sys
        logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("bertdistill.steps.demo").info("demo: 3 of 4 files")
        if os.environ.get("TQDM_DISABLE") != "1":
            for i in range(1, 4):
                sys.stderr.write(f"\\rDownloading: {i}/3")
            sys.stderr.write("\\n")
        print("demo: 4 files -> out")
        sys.stdout.buffer.write(b"not UTF-8: \\xff\\n")
    """)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(local, "step_command", lambda arguments, ranks=1: [sys.executable, "-c", child])
    logged: list[str] = []

    class TaskLog:
        def info(self, message: str, *args: object) -> None:
            logged.append(message % args)

        def warning(self, message: str, *args: object) -> None:
            """Airflow's note that execute() ran outside its task runner, as a test calls it."""

    monkeypatch.setattr(local.LocalStepOperator, "log", property(lambda self: TaskLog()))
    for env, bar in (({}, ["Downloading: 3/3"]), (Settings().step_env(), [])):
        logged.clear()
        local.LocalStepOperator(task_id="demo", arguments=["demo"], env_vars=env).execute({})
        step_lines = logged[1:]  # after "running: ..."
        assert step_lines[0] == "INFO bertdistill.steps.demo: demo: 3 of 4 files"
        assert [line for line in step_lines if "Downloading" in line] == bar  # one line, its last state
        assert step_lines[-2:] == ["demo: 4 files -> out", "not UTF-8: \ufffd"]  # relayed, not a crash
        assert len(step_lines) == 3 + len(bar)


def test_steps_draw_no_progress_bars_as_processes_or_pods():
    from bertdistill.orchestration.runners import StepOperators, pod_kwargs

    for mode in ("local", "kubernetes"):
        settings = Settings(mode=mode)
        assert StepOperators(settings).env().items() >= PROGRESS_OFF.items(), mode
    pod_env = pod_kwargs(Settings(mode="kubernetes"), "fetch_teacher", StepOperators(Settings()).env())["env_vars"]
    assert pod_env.items() >= PROGRESS_OFF.items()
