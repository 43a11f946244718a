"""The MPIJob operator's branches against a stubbed API, in-process and in seconds.

The emulator tests (test_kubernetes_mode.py) and the container test (tests/containers) run the
whole path; these pin the decisions that only show when something goes wrong: a broken API
keeps the job for the retry to adopt, a log is copied once however often it is read, the
trigger reports what it saw.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

pytest.importorskip("airflow")

from airflow.sdk.exceptions import AirflowException
from kubernetes.client.exceptions import ApiException

from bertdistill.orchestration import mpijob
from bertdistill.orchestration.settings import Settings

TI = SimpleNamespace(dag_id="bert_distillation", task_id="distill", run_id="manual__x", map_index=-1, try_number=1)


class FakeLauncher:
    """Records what the operator asks of the API; `poll` answers from a script."""

    def __init__(self, answers):
        self.answers, self.deleted, self.created = list(answers), [], []

    def find(self, labels):
        return None

    def create(self, base, body_for):
        self.created.append(body_for(f"{base}-0000"))
        return f"{base}-0000"

    def poll(self, name, started, startup_timeout):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def delete(self, name):
        self.deleted.append(name)


def _operator(launcher: FakeLauncher, **kwargs) -> mpijob.MPIJobOperator:
    op = mpijob.MPIJobOperator(task_id="distill", arguments=["distill", "--steps", "4"], workers=2,
                               settings=Settings(mode="kubernetes"), env_vars={}, poll_interval=0,
                               worker_resources={"cpu": "1", "memory": "1Gi"}, **kwargs)
    op.launcher = lambda: launcher
    return op


def test_a_job_that_succeeds_is_deleted_and_its_body_is_bounded():
    launcher = FakeLauncher([None, {"type": "Succeeded", "reason": "MPIJobSucceeded", "message": ""}])
    _operator(launcher).execute({"ti": TI})
    assert launcher.deleted == ["bertdistill-distill-0000"]
    [body] = launcher.created
    assert body["spec"]["runPolicy"]["activeDeadlineSeconds"] == int(timedelta(days=3).total_seconds())
    assert body["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 3600


def test_a_failed_job_is_deleted_and_fails_the_task():
    launcher = FakeLauncher([{"type": "Failed", "reason": "MPIJobFailed", "message": "launcher exited 2"}])
    with pytest.raises(AirflowException, match="failed: MPIJobFailed launcher exited 2"):
        _operator(launcher).execute({"ti": TI})
    assert launcher.deleted == ["bertdistill-distill-0000"]


def test_an_api_outage_while_following_keeps_the_job_for_the_retry():
    launcher = FakeLauncher([None, ApiException(status=503, reason="Service Unavailable")])
    with pytest.raises(ApiException):
        _operator(launcher).execute({"ti": TI})
    assert launcher.deleted == []  # hours of training are not thrown away over an API blip


def test_the_deferred_operator_keeps_the_job_when_the_trigger_lost_track():
    launcher = FakeLauncher([])
    op = _operator(launcher, deferrable=True)
    with pytest.raises(AirflowException, match="kept, and a retry adopts it"):
        op.execute_complete({"ti": TI}, {"type": "Error", "name": "job-1", "message": "503"})
    assert launcher.deleted == []
    op.execute_complete({"ti": TI}, {"type": "Succeeded", "name": "job-1", "reason": "", "message": ""})
    assert launcher.deleted == ["job-1"]


def test_the_trigger_yields_the_outcome_and_serializes_what_it_needs(monkeypatch):
    answers = iter([None, None, {"type": "Succeeded", "reason": "MPIJobSucceeded", "message": ""}])
    monkeypatch.setattr(mpijob.MPIJobLauncher, "poll", lambda self, name, started, timeout: next(answers))
    trigger = mpijob.MPIJobTrigger("job-1", "bertdistill", "kubernetes_default", 0, 60, 0.0)
    path, kwargs = trigger.serialize()
    assert path == "bertdistill.orchestration.mpijob.MPIJobTrigger" and mpijob.MPIJobTrigger(**kwargs).name == "job-1"

    async def first():
        async for event in trigger.run():
            return event.payload

    assert asyncio.run(first()) == {"type": "Succeeded", "reason": "MPIJobSucceeded", "message": "", "name": "job-1"}


def test_the_launcher_log_is_copied_once_however_often_it_is_read():
    """The API server cuts by whole seconds (sinceSeconds): lines already copied come again and are skipped."""
    now = datetime.now(UTC)
    lines = [(now - timedelta(seconds=3), "step 1"), (now - timedelta(seconds=2), "step 2")]
    asked = []

    def read_log(name, namespace, container, timestamps, since_seconds, _preload_content):
        asked.append(since_seconds)
        text = "".join(f"{t.strftime('%Y-%m-%dT%H:%M:%S.%f')}123Z {line}\n" for t, line in lines)
        return SimpleNamespace(data=text.encode())

    pod = SimpleNamespace(metadata=SimpleNamespace(name="job-1-launcher", creation_timestamp=now))
    core = SimpleNamespace(list_namespaced_pod=lambda ns, label_selector: SimpleNamespace(items=[pod]),
                           read_namespaced_pod_log=read_log)
    copied = []
    launcher = mpijob.MPIJobLauncher("bertdistill", "kubernetes_default",
                                      SimpleNamespace(info=lambda fmt, line: copied.append(line), warning=print))
    launcher.hook = lambda: SimpleNamespace(core_v1_client=core)
    launcher.copy_launcher_log("job-1")
    lines.append((datetime.now(UTC), "step 3"))
    launcher.copy_launcher_log("job-1")
    launcher.copy_launcher_log("job-1")
    assert copied == ["step 1", "step 2", "step 3"]
    assert asked[0] is None and all(isinstance(s, int) and s >= 1 for s in asked[1:])


def test_step_pods_use_no_deprecated_provider_flag():
    """`reattach_on_restart` warns on every task since provider 10.20; `durable` replaces it."""
    import warnings

    from airflow.exceptions import AirflowProviderDeprecationWarning

    from bertdistill.orchestration.pods import StepPodOperator
    from bertdistill.orchestration.runners import pod_kwargs

    with warnings.catch_warnings():
        warnings.simplefilter("error", AirflowProviderDeprecationWarning)
        op = StepPodOperator(task_id="extract", arguments=["extract"],
                             **pod_kwargs(Settings(mode="kubernetes"), "extract", {}))
    assert op.durable is True


def test_settings_are_read_without_touching_airflow_variables(monkeypatch):
    """The DAG file loads Settings at every parse: no Variable (a metadata-database call) may be read."""
    from airflow.sdk import Variable

    def refuse(*args, **kwargs):
        raise AssertionError("Variable.get called while loading settings")

    monkeypatch.setattr(Variable, "get", refuse)
    monkeypatch.setenv("BERTDISTILL_MODE", "kubernetes")
    assert Settings.load().mode == "kubernetes"
