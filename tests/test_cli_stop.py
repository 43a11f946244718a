"""A step stopped by SIGTERM (Airflow killing its task, Kubernetes deleting its pod) closes its MLflow run
KILLED, whenever the signal comes: while the run is being opened, while the step works, while it logs."""

from __future__ import annotations

import os
import signal

import pytest

from bertdistill import cli, tracking
from bertdistill.manifest import Manifest
from bertdistill.steps import fetch_teacher

ARGS = ["fetch-teacher", "--source", "/nowhere/teacher", "--output", "/nowhere/out"]


@pytest.fixture
def closed(monkeypatch) -> list[tuple[str | None, str]]:
    """The (run id, status) each close of a step's run got; SIGTERM's handler put back after the test."""
    calls: list[tuple[str | None, str]] = []
    monkeypatch.setattr(tracking, "close_step", lambda run_id, status, error="": calls.append((run_id, status)))
    previous = signal.getsignal(signal.SIGTERM)
    yield calls
    signal.signal(signal.SIGTERM, previous)


def _step(result: Manifest | None):
    """fetch-teacher's run, typed as the CLI reads it, doing nothing but return `result` (None: fail)."""
    def run(params: fetch_teacher.FetchTeacherParams) -> Manifest:
        if result is None:
            pytest.fail("the step ran after its stop")
        return result
    return run


def _stop_self(result=None):
    def stop(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return result
    return stop


def test_a_stop_while_the_run_opens_closes_that_run_killed(monkeypatch, closed):
    """Seen under make up: a run marked failed while fetch-teacher started left its step run RUNNING."""
    monkeypatch.setattr(tracking, "open_step", _stop_self("run-1"))
    monkeypatch.setattr(fetch_teacher, "run", _step(None))
    with pytest.raises(cli.Stopped) as stopped:
        cli.main(ARGS)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert closed == [("run-1", "KILLED")]


def test_a_stop_while_the_step_logs_its_results_closes_its_run_killed(monkeypatch, closed):
    monkeypatch.setattr(tracking, "open_step", lambda step, output: "run-2")
    monkeypatch.setattr(fetch_teacher, "run", _step(Manifest("fetch-teacher", {}, {})))
    monkeypatch.setattr(tracking, "log_step", _stop_self())
    with pytest.raises(cli.Stopped):
        cli.main(ARGS)
    assert closed == [("run-2", "KILLED")]
