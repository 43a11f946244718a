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

Only the MLflow client is imported here, never TensorFlow: the Airflow DAG uses this module.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "BERTDISTILL_PARENT_RUN_ID"
ARTIFACTS_ENV = "BERTDISTILL_MLFLOW_ARTIFACTS"
DEFAULT_EXPERIMENT = "bertdistill"
SERIES = {"losses": "loss", "step_seconds": "step_seconds"}  # summary lists logged as metric curves
SMALL_ARTIFACT_BYTES = 5 << 20
ARTIFACT_SUFFIXES = (".json", ".png")


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def experiment_id(name: str | None = None) -> str:
    """The experiment's id, created on first use (MLFLOW_EXPERIMENT_NAME, else 'bertdistill')."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    c = client()
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location())
    except Exception:  # another task created it between the two calls
        return c.get_experiment_by_name(name).experiment_id


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
    run = c.create_run(experiment_id(), run_name=run_name, tags={"bertdistill.kind": "pipeline", **(tags or {})})
    c.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())],
                tags=[RunTag("bertdistill.state", "running")])
    return run.info.run_id


def end_pipeline(run_id: str, status: str = "FINISHED", **tags: str) -> None:
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, f"bertdistill.{key}", value)
    c.set_tag(run_id, "bertdistill.state", status.lower())
    c.set_terminated(run_id, status)


def log_step(step: str, manifest: Manifest, output_uri: str) -> str | None:
    """One child run for one finished (or reused) step; returns its id, None when tracking is off."""
    if not enabled():
        return None
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    c = client()
    parent = parent_run_id()
    tags = {"bertdistill.step": step, "bertdistill.output": output_uri}
    if parent:
        tags["mlflow.parentRunId"] = parent
        exp = c.get_run(parent).info.experiment_id
    else:
        exp = experiment_id()
    run_id = (manifest.summary or {}).get("mlflow_run_id")  # a step that opened its own run (publish)
    if run_id:
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items() if k != "mlflow.parentRunId"])
    else:
        name = f"{step} {'/'.join(output_uri.rstrip('/').split('/')[-2:])}"
        run_id = c.create_run(exp, run_name=name, tags=tags).info.run_id
    try:
        params = [Param(k, _param_value(v)) for k, v in sorted(manifest.params.items())]
        params.append(Param("output", output_uri[:6000]))
        summary = dict(manifest.summary or {})
        headline, headline_tags = summary.pop("parent_metrics", {}), summary.pop("parent_tags", {})
        metrics = list(_metrics(summary))
        if manifest.seconds is not None:
            metrics.append(Metric("step_wall_seconds", float(manifest.seconds), 0, 0))
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
    c.set_terminated(run_id, "FINISHED")
    log.info("%s: logged to MLflow run %s (%s)", step, run_id, os.environ.get("MLFLOW_TRACKING_URI"))
    return run_id


def parent_run_id() -> str | None:
    """The pipeline run's id; a template that rendered nothing (no `prepare` task ran) is no parent."""
    value = os.environ.get(PARENT_RUN_ENV, "").strip()
    return None if value in ("", "None") else value


def log_failure(step: str, error: str, output_uri: str | None) -> None:
    """A failed step still shows up under its pipeline run, with the error it printed."""
    if not (enabled() and parent_run_id()):
        return
    c = client()
    parent = parent_run_id()
    run = c.create_run(c.get_run(parent).info.experiment_id, run_name=f"{step} (failed)",
                       tags={"mlflow.parentRunId": parent, "bertdistill.step": step,
                             "bertdistill.error": error[:5000], "bertdistill.output": output_uri or ""})
    c.set_terminated(run.info.run_id, "FAILED")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:6000]


def _metrics(summary: dict[str, Any], prefix: str = ""):
    """Numbers as metrics at step 0, the known series as curves, nested dicts with dotted keys."""
    from mlflow.entities import Metric

    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            yield Metric(name, float(value), 0, 0)
        elif isinstance(value, dict):
            yield from _metrics(value, f"{name}.")
        elif key in SERIES and isinstance(value, list):
            first = int(summary.get("resumed_from") or 0)
            for i, v in enumerate(value):
                yield Metric(SERIES[key], float(v), 0, i + 1 if key == "losses" else first + i + 1)


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
