"""An Airflow listener that makes what MLflow and Airflow show of a finished DAG run agree.

Why a listener and no teardown task: Airflow lets a teardown decide a run's state. A run
marked failed by hand while a teardown is pending stays running until the teardown ends, and
then takes the state of its leaves, which the click had set to skipped: the run ends
*success*. The paused DAG's teardown is never scheduled at all, so its run stays running for
good. Without a teardown, Airflow sets the state of a run marked failed at once, and calls
this listener wherever a run ends:

- in the scheduler (or `airflow dags test`), when the run ends by itself: the pipeline's
  MLflow run is closed FINISHED, or FAILED naming the failed tasks; a run that did nothing
  (check_dump found the dump already published) gets a note in the grid saying so;
- in the api-server, when a person marks the run failed or successful: the pipeline's run is
  closed KILLED (step runs still open too), and the tasks of a mapped step that had finished
  before the click keep their state (Airflow marks every index of a running mapped task).

Registered as an Airflow plugin (entry point `airflow.plugins`). A listener must never break
the component that calls it: failures are logged, not raised.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)
T = TypeVar("T")

DAGS = ("bert_distillation", "bert_distillation_monthly")
MANUAL = "manually"  # Airflow's message for a state set through the UI or the REST API

# (dag_id, run_id) -> {(task_id, map_index)} of the task instances a click on "mark failed" or
# "mark success" killed: the api-server reports them to on_task_instance_* before on_dag_run_*.
_killed: dict[tuple[str, str], set[tuple[str, int]]] = {}


def close_pipeline_runs(dag_id: str, run_id: str, status: str, **tags: str) -> list[str]:
    """Close the MLflow parent run(s) of one DAG run still RUNNING, and their open step runs (KILLED)."""
    from bertdistill import tracking
    from bertdistill.orchestration.settings import Settings
    from bertdistill.orchestration.tasks import tracking_env

    tracking_env(Settings.load())
    c = tracking.client()
    closed = []
    for parent in tracking.open_runs(c, f"tags.`airflow.run_id` = '{run_id}' and tags.`airflow.dag_id` = '{dag_id}'"):
        tracking.end_pipeline(parent.info.run_id, status, **tags)
        closed.append(parent.info.run_id)
    return closed


def failed_tasks(task_instances: list[Any]) -> list[str]:
    """The tasks that failed by themselves (not those skipped for it: upstream_failed), with their map
    index when mapped."""
    return sorted(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]" for ti in task_instances
                  if ti.state == "failed")


def restore_finished(dag_run: Any, killed: set[tuple[str, int]], session: Any) -> list[str]:
    """Give back the state a mapped task's indices had before a run was marked failed or successful.

    Airflow sets every index of a mapped task that had one index running: those that had
    succeeded turn failed, those not yet started too. Airflow's own audit log (one row per state
    a task's runner reported) says how each index had ended: success and failure are restored,
    an index that never ran becomes skipped like the other tasks that never ran.
    """
    from airflow.models.log import Log
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    mapped = {task_id for task_id, map_index in killed if map_index >= 0}
    if not mapped:
        return []
    restored = []
    for ti in session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id,
            TaskInstance.task_id.in_(mapped), TaskInstance.map_index >= 0)):
        if (ti.task_id, ti.map_index) in killed:
            continue
        ended = session.scalars(select(Log.event).where(
            Log.dag_id == ti.dag_id, Log.run_id == ti.run_id, Log.task_id == ti.task_id,
            Log.map_index == ti.map_index, Log.try_number == ti.try_number,
            Log.event.in_(("success", "failed", "skipped"))).order_by(Log.id.desc()).limit(1)).first()
        before = TaskInstanceState(ended) if ended else TaskInstanceState.SKIPPED
        if ti.state != before:
            ti.set_state(before, session=session)
            restored.append(f"{ti.task_id}[{ti.map_index}] {before.value}")
    return restored


def note_nothing_to_do(dag_run: Any, session: Any) -> str | None:
    """The run's note, when check_dump stopped it: which dump was already published, as which model."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    from bertdistill.orchestration.tasks import NOTHING_TO_DO

    row = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids="check_dump",
                                             key=NOTHING_TO_DO)).first()
    if row is None:
        return None
    reason = XComModel.deserialize_value(row)
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id))
    run.note = (f"Nothing to do: {reason}", None)
    return reason


def in_session(dag_run: Any, work: Callable[[Any], T]) -> T:
    """`work` in the session that holds the run (the api-server's request, the scheduler's loop: the
    change commits with theirs), else in a session of its own (`airflow dags test`)."""
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is not None:
        return work(session)
    from airflow.utils.session import create_session

    with create_session() as session:
        return work(session)


def _ended(dag_run: Any, msg: str | None, status: str) -> None:
    if getattr(dag_run, "dag_id", None) not in DAGS:
        return
    killed = _killed.pop((dag_run.dag_id, dag_run.run_id), set())
    try:
        tags: dict[str, str] = {}
        if MANUAL in (msg or ""):
            status = "KILLED"
            tags["stopped"] = f"the Airflow run was marked {dag_run.state} by hand"
            restored = in_session(dag_run, lambda session: restore_finished(dag_run, killed, session))
            if restored:
                log.info("kept the state these tasks had before the click: %s", ", ".join(restored))
        elif status == "FAILED":
            tis = in_session(dag_run, lambda session: dag_run.get_task_instances(session=session))
            tags["failed_tasks"] = ", ".join(failed_tasks(tis))
        else:
            in_session(dag_run, lambda session: note_nothing_to_do(dag_run, session))
        closed = close_pipeline_runs(dag_run.dag_id, dag_run.run_id, status, **tags)
        if closed:
            log.info("closed MLflow run(s) %s of %s as %s (%s)", ", ".join(closed), dag_run.run_id, status, msg)
    except Exception:
        log.exception("could not close the MLflow runs of %s %s", dag_run.dag_id, dag_run.run_id)


def _task_killed(task_instance: Any) -> None:
    if getattr(task_instance, "dag_id", None) in DAGS:
        _killed.setdefault((task_instance.dag_id, task_instance.run_id), set()).add(
            (task_instance.task_id, task_instance.map_index))


@hookimpl
def on_task_instance_failed(previous_state, task_instance, error):
    if MANUAL in str(error or ""):
        _task_killed(task_instance)


@hookimpl
def on_task_instance_success(previous_state, task_instance):
    if previous_state is None:  # the api-server's report of a task a "mark success" click ended
        _task_killed(task_instance)


@hookimpl
def on_dag_run_failed(dag_run, msg: str):
    _ended(dag_run, msg, "FAILED")


@hookimpl
def on_dag_run_success(dag_run, msg: str):
    _ended(dag_run, msg, "FINISHED")


class BertdistillPlugin(AirflowPlugin):
    name = "bertdistill"
    listeners: ClassVar[list] = [sys.modules[__name__]]
