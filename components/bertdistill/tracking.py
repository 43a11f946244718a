"""MLflow: one parent run per pipeline run, one child run per step.

A step logs to MLflow when a tracking URI is configured (MLFLOW_TRACKING_URI; the pipeline
always sets one, by default a local sqlite store), so a step run by hand leaves no database
behind. The child run hangs under the parent named by BERTDISTILL_PARENT_RUN_ID, which the
pipeline's first task creates. Everything a child logs comes from the step's manifest:
its parameters, its numeric summary as metrics (loss curves with their step numbers), the
manifest itself and the small report files as artifacts, and its inputs as datasets that
name the store URIs and their content fingerprints, so a model in the registry leads back
to the dump it was trained on. A step's `parent_metrics` and `parent_tags` (evaluate's
distillation gain and verdict) go on the parent run too: the figures a user looks for first.
The parent run's description (MLflow's note) links its Airflow run and says what it distils;
at the end it gains the status, the verdict and the headline accuracies.

Only the MLflow client is imported here, never TensorFlow: the Airflow DAG uses this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bertdistill.errors import StepError, TransientError
from bertdistill.manifest import Manifest
from bertdistill.parallel import launcher_rank
from bertdistill.run_notes import NOTE_TAG, OUTCOME_HEADING, note, pipeline_description, pipeline_outcome

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "BERTDISTILL_PARENT_RUN_ID"
STEP_RUN_ENV = "BERTDISTILL_STEP_RUN_ID"  # the step's own run, opened when it starts
ARTIFACTS_ENV = "BERTDISTILL_MLFLOW_ARTIFACTS"
DEFAULT_EXPERIMENT = "bertdistill"
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"
SERIES = {"losses": "loss", "step_seconds": "step_seconds"}  # summary lists logged as metric curves
# Summary entries that restate a setting, not a measurement: params, not metric charts.
SETTINGS_IN_SUMMARY = {"steps", "resumed_from", "student_layers", "student_parameters", "ranks", "top_k",
                       "max_seq_length", "max_predictions_per_seq", "most_frequent_token_id", "model_version",
                       "previous_champion_version", "chunks", "shuffle_buckets", "layers", "parameters"}
SMALL_ARTIFACT_BYTES = 5 << 20
ARTIFACT_SUFFIXES = (".json", ".png")


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def experiment_id(name: str | None = None) -> str:
    """The experiment's id, created on first use (MLFLOW_EXPERIMENT_NAME, else 'bertdistill'),
    marked as model training (MLflow 3.17's UI still opens it on its GenAI view: the runs table is
    `#/experiments/<id>/runs?workflowType=machine_learning`, the link the demo's summary prints)."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    c = client()
    found = c.get_experiment_by_name(name)
    if found is None:
        with contextlib.suppress(Exception):  # another task may create it between the two calls
            c.create_experiment(name, artifact_location=artifact_location(), tags={EXPERIMENT_KIND: TRAINING})
        found = c.get_experiment_by_name(name)
    if found.tags.get(EXPERIMENT_KIND) != TRAINING:
        c.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, TRAINING)
    return found.experiment_id


def artifact_location() -> str | None:
    """BERTDISTILL_MLFLOW_ARTIFACTS, else beside a sqlite store's file; None leaves it to the server."""
    if os.environ.get(ARTIFACTS_ENV):
        return os.environ[ARTIFACTS_ENV]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def start_pipeline(run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run; returns its id for the steps' environment."""
    from mlflow.entities import Param, RunTag

    c = client()
    tags = {"bertdistill.kind": "pipeline", **(tags or {})}
    tags[NOTE_TAG] = pipeline_description(params, tags)
    run = c.create_run(experiment_id(), run_name=run_name, tags=tags)
    c.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())],
                tags=[RunTag("bertdistill.state", "running")])
    return run.info.run_id


def end_pipeline(run_id: str, status: str = "FINISHED", **tags: str) -> None:
    """Close the pipeline's run and any step run under it still open (KILLED: its step never closed it)."""
    c = client()
    run = c.get_run(run_id)
    wall = time.time() - run.info.start_time / 1000
    c.log_metric(run_id, "pipeline_wall_seconds", wall)
    for child in open_runs(c, f"tags.`mlflow.parentRunId` = '{run_id}'", run.info.experiment_id):
        c.set_tag(child.info.run_id, "bertdistill.state", "killed")
        c.set_terminated(child.info.run_id, "KILLED")
    for key, value in tags.items():
        c.set_tag(run_id, f"bertdistill.{key}", value)
    c.set_tag(run_id, "bertdistill.state", status.lower())
    run = c.get_run(run_id)  # with what the steps put on it meanwhile (evaluate's verdict, publish's version)
    opening = run.data.tags.get(NOTE_TAG, "").split(OUTCOME_HEADING)[0].rstrip()  # once, if closed twice
    outcome = pipeline_outcome(status, wall, run.data.tags, run.data.metrics)
    c.set_tag(run_id, NOTE_TAG, note(f"{opening}\n\n{outcome}" if opening else outcome))
    c.set_terminated(run_id, status)


def open_runs(c, filter_string: str, experiment: str | None = None) -> list:
    """Runs still RUNNING that match an MLflow search filter."""
    experiments = [experiment] if experiment else [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(experiments, f"{filter_string} and attributes.status = 'RUNNING'", max_results=1000)


def step_run_name(step: str, output_uri: str | None) -> str:
    """A child run's name a person reads: the step, and which shard or which training it is."""
    parts = (output_uri or "").rstrip("/").split("/")
    if parts[-1].startswith("shard-"):
        return f"{step} {parts[-2]}/{parts[-1].split('.')[0]}"
    if "control" in parts:
        return f"{step} (no-teacher control)"
    return step


def open_step(step: str, output_uri: str | None) -> str | None:
    """The step's child run, opened RUNNING as the step starts (so MLflow shows its real duration
    and a killed step's run is found open and closed KILLED); None when tracking is off or on a
    Horovod rank other than 0. Its id goes into the environment for the step's own logging."""
    if not enabled() or launcher_rank() != 0:
        return None
    c = client()
    parent = parent_run_id()
    tags = {"bertdistill.step": step, "bertdistill.output": output_uri or "", "bertdistill.state": "running"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    exp = c.get_run(parent).info.experiment_id if parent else experiment_id()
    run_id = c.create_run(exp, run_name=step_run_name(step, output_uri), tags=tags).info.run_id
    os.environ[STEP_RUN_ENV] = run_id
    return run_id


def step_run_id() -> str | None:
    return os.environ.get(STEP_RUN_ENV) or None


_live: set[str] = set()  # metric names the step logged while it ran
_live_buffer: list = []  # metrics not sent yet
_live_state = {"sent": 0.0, "failures": 0}
LIVE_FLUSH_SECONDS = 10.0


def log_live(metrics: dict[str, float], step: int) -> None:
    """Metrics while a step runs (distill's loss, learning rate, gradient norm), each with its real
    time, sent every LIVE_FLUSH_SECONDS (one request, whatever the step rate).

    Tracking never stops training: a failure to send is a warning, once.
    """
    if not step_run_id():
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _live_buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
    _live.update(metrics)
    if time.monotonic() - _live_state["sent"] >= LIVE_FLUSH_SECONDS:
        flush_live()


def flush_live() -> None:
    run_id = step_run_id()
    batch, _live_buffer[:] = list(_live_buffer), []
    _live_state["sent"] = time.monotonic()
    if not (run_id and batch):
        return
    try:
        for i in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            client().log_batch(run_id, metrics=batch[i: i + 1000])
    except Exception as exc:
        if not _live_state["failures"]:
            log.warning("could not log metrics to MLflow run %s (%s); training goes on", run_id, exc)
        _live_state["failures"] += 1


def close_step(run_id: str | None, status: str, error: str = "") -> None:
    """A step that failed (FAILED) or was stopped (KILLED) closes its own run with what it printed."""
    if not run_id:
        return
    flush_live()
    c = client()
    if error:
        c.set_tag(run_id, "bertdistill.error", error[:5000])
    c.set_tag(run_id, "bertdistill.state", status.lower())
    c.set_terminated(run_id, status)


def log_step(step: str, manifest: Manifest, output_uri: str, run_id: str | None = None,
             cpu_seconds: float | None = None) -> str | None:
    """A finished (or reused) step's parameters, summary, inputs and small files, into its run
    (the one opened at its start, else a new one); returns its id, None when tracking is off.
    `cpu_seconds`: what this process used, so a month's runs show what each step cost (little when
    it found its output done)."""
    if not enabled():
        return None
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    flush_live()
    c = client()
    parent = parent_run_id()
    run_id = run_id or (manifest.summary or {}).get("mlflow_run_id")  # publish logs its model into one
    if not run_id:
        tags = {"bertdistill.step": step, "bertdistill.output": output_uri}
        if parent:
            tags["mlflow.parentRunId"] = parent
        exp = c.get_run(parent).info.experiment_id if parent else experiment_id()
        run_id = c.create_run(exp, run_name=step_run_name(step, output_uri), tags=tags).info.run_id
    try:
        params = [Param(k, _param_value(v)) for k, v in sorted(manifest.params.items())]
        params.append(Param("output", output_uri[:6000]))
        summary = dict(manifest.summary or {})
        headline, headline_tags = summary.pop("parent_metrics", {}), summary.pop("parent_tags", {})
        settings = {k: summary[k] for k in sorted(summary) if k in SETTINGS_IN_SUMMARY or k.endswith("_config")}
        params += [Param(k if k not in manifest.params else f"resolved.{k}", _param_value(v))
                   for k, v in settings.items() if manifest.params.get(k) != v]
        if parent:  # the pipeline's settings too, so the Compare page tells two students apart
            params += [Param(f"pipeline.{k}", v) for k, v in sorted(c.get_run(parent).data.params.items())]
        measured = {k: v for k, v in summary.items() if not k.endswith("_config")}
        metrics = [m for m in _metrics(measured)
                   if m.key not in _live and m.key.rsplit(".", 1)[-1] not in SETTINGS_IN_SUMMARY]
        if manifest.seconds is not None:
            metrics.append(Metric("step_wall_seconds", float(manifest.seconds), 0, 0))
        if cpu_seconds is not None:
            metrics.append(Metric("step_cpu_seconds", round(cpu_seconds, 3), 0, 0))
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params and 1000 metrics
            c.log_batch(run_id, params=params[i: i + 100])
        for i in range(0, len(metrics), 1000):
            c.log_batch(run_id, metrics=metrics[i: i + 1000])
        datasets = [DatasetInput(DatasetEntity(name=role, digest=fingerprint[:36], source_type=_source_type(uri),
                                               source=json.dumps({"uri": uri})),
                                 tags=[InputTag("mlflow.data.context", role)])
                    for role, uri, fingerprint in _inputs(manifest)]
        for attempt in range(3):
            try:
                c.log_inputs(run_id, datasets=datasets)
                break
            except Exception:
                # Parallel shard steps register the same dataset at once, and the server's
                # get-or-create loses the race with a unique-constraint error; the retry finds it.
                if attempt == 2:
                    raise
                time.sleep(0.5 + random.random())
        _log_artifacts(c, run_id, manifest, output_uri)
        c.log_batch(run_id, tags=[RunTag("bertdistill.created", manifest.created or "")])
        if parent and (headline or headline_tags):  # a step's headline figures show on the pipeline's run
            c.log_batch(parent, metrics=list(_metrics(headline)),
                        tags=[RunTag(f"bertdistill.{k}", str(v)[:5000]) for k, v in headline_tags.items()])
    except Exception:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_tag(run_id, "bertdistill.state", "finished")
    c.set_terminated(run_id, "FINISHED")
    log.info("%s: logged to MLflow run %s (%s)", step, run_id, os.environ.get("MLFLOW_TRACKING_URI"))
    return run_id


def parent_run_id() -> str | None:
    """The pipeline run's id; a template that rendered nothing (no `prepare` task ran) is no parent."""
    value = os.environ.get(PARENT_RUN_ENV, "").strip()
    return None if value in ("", "None") else value


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:6000]


def _metrics(summary: dict[str, Any], prefix: str = ""):
    """Numbers as metrics at step 0, the known series as curves, nested dicts with dotted keys;
    stamped with the time they are logged (the step's end)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            yield Metric(name, float(value), now, 0)
        elif isinstance(value, dict):
            yield from _metrics(value, f"{name}.")
        elif key in SERIES and isinstance(value, list):
            first = int(summary.get("resumed_from") or 0)
            for i, v in enumerate(value):
                yield Metric(SERIES[key], float(v), now, i + 1 if key == "losses" else first + i + 1)


def _inputs(manifest: Manifest):
    for role, entry in sorted(manifest.inputs.items()):
        uri, _, fingerprint = entry.partition(" ")
        yield role, uri, fingerprint or "-"


def _source_type(uri: str) -> str:
    return "s3" if uri.startswith("s3://") else "local"


def _log_artifacts(c, run_id: str, manifest: Manifest, output_uri: str) -> None:
    from bertdistill.store import open_folder

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_bytes(manifest.to_bytes())
        c.log_artifact(run_id, str(path))
        for name, entry in sorted(manifest.outputs.items()):
            if name.endswith(ARTIFACT_SUFFIXES) and "/" not in name and entry.get("bytes", 0) <= SMALL_ARTIFACT_BYTES:
                local = Path(tmp) / name
                local.write_bytes(open_folder(output_uri).read_bytes(name))
                c.log_artifact(run_id, str(local))


def registry_error(exc: Exception, what: str) -> StepError:
    """A tracking server that could not be reached is a transient fault (retried); a refusal is not."""
    where = os.environ.get("MLFLOW_TRACKING_URI") or "default store"
    if _unreachable(exc):
        return TransientError(f"{what} failed: MLflow at {where} cannot be reached ({exc}); "
                              "check MLFLOW_TRACKING_URI and that the server is up")
    return StepError(f"{what} failed at MLflow ({where}): {exc}; check MLFLOW_TRACKING_URI and the server's log")


def _unreachable(exc: BaseException | None) -> bool:
    """Whether a connection failure or time-out is anywhere in the exception's chain."""
    import requests

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout) or (
                "Max retries exceeded" in str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
