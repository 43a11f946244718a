"""An Airflow listener that closes a pipeline's MLflow runs when its DAG run ends without its
teardown: a run marked failed or successful by hand skips every task not yet started, the
`close_tracking` teardown included, and kills the running one before it can close its own
MLflow run. Registered as an Airflow plugin (entry point `airflow.plugins`), so the api-server
that takes the click and the scheduler that fails a run both call it.

A listener must never break the component that calls it: failures are logged, not raised.
"""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

DAGS = ("bert_distillation", "bert_distillation_monthly")


def close_pipeline_runs(dag_id: str, run_id: str, status: str) -> list[str]:
    """Close the MLflow parent run(s) of one DAG run still RUNNING, and their open step runs (KILLED)."""
    from bertdistill import tracking
    from bertdistill.orchestration.settings import Settings
    from bertdistill.orchestration.tasks import tracking_env

    tracking_env(Settings.load())
    c = tracking.client()
    closed = []
    for parent in tracking.open_runs(c, f"tags.`airflow.run_id` = '{run_id}' and tags.`airflow.dag_id` = '{dag_id}'"):
        tracking.end_pipeline(parent.info.run_id, status)
        closed.append(parent.info.run_id)
    return closed


def _close(dag_run, msg: str | None, status: str) -> None:
    if getattr(dag_run, "dag_id", None) not in DAGS:
        return
    try:
        closed = close_pipeline_runs(dag_run.dag_id, dag_run.run_id, status)
        if closed:
            log.info("closed MLflow run(s) %s of %s as %s (%s)", ", ".join(closed), dag_run.run_id, status, msg)
    except Exception:
        log.exception("could not close the MLflow runs of %s %s", dag_run.dag_id, dag_run.run_id)


@hookimpl
def on_dag_run_failed(dag_run, msg: str):
    _close(dag_run, msg, "KILLED" if "manually" in (msg or "") else "FAILED")


@hookimpl
def on_dag_run_success(dag_run, msg: str):
    _close(dag_run, msg, "FINISHED")


class BertdistillPlugin(AirflowPlugin):
    name = "bertdistill"
    listeners: ClassVar[list] = [sys.modules[__name__]]
