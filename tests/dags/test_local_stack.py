"""`make up`'s stack, driven like a user's script would: REST API token, trigger with conf, success.

Airflow's api-server, scheduler (LocalExecutor), dag-processor and triggerer plus an MLflow
server, started by local_stack on free ports; only 127.0.0.1 is listened on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import free_port
from tests.dags.test_dag_run import MODEL, TINY

pytest.importorskip("airflow")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow


def _call(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, airflow_env, sample, hf_teacher):
    from bertdistill.orchestration import local_stack

    root = tmp_path_factory.mktemp("stack")
    # The scheduler runs as a user's would: the form's DAG has no schedule, so unpausing it starts nothing.
    extra = {"BERTDISTILL_MIRROR": str(sample / "mirror"), "BERTDISTILL_TEACHER": str(hf_teacher),
             "PYTHONPATH": airflow_env["PYTHONPATH"]}
    info = local_stack.up(root / "airflow", root / "data", free_port(), free_port(), extra_env=extra, timeout=300)
    try:
        yield info, root
    finally:
        local_stack.down(root / "airflow")


def test_a_run_triggered_through_the_rest_api_succeeds(stack):
    info, root = stack
    api = info["airflow"]
    status, token = _call("POST", f"{api}/auth/token", {"username": info["user"], "password": info["password"]})
    assert status in (200, 201), token
    token = token["access_token"]
    deadline = time.monotonic() + 180
    while _call("GET", f"{api}/api/v2/dags/bert_distillation", token=token)[0] != 200:  # parsed yet?
        assert time.monotonic() < deadline, "the dag-processor never parsed dags/bert_distillation.py"
        time.sleep(2)
    assert _call("PATCH", f"{api}/api/v2/dags/bert_distillation", {"is_paused": False}, token)[0] == 200

    # A bad param is refused by the API itself: no run is created.
    status, body = _call("POST", f"{api}/api/v2/dags/bert_distillation/dagRuns",
                         {"logical_date": None, "conf": {**TINY, "train_steps": -1}}, token)
    assert status == 400 and "train_steps" in json.dumps(body)
    assert _call("GET", f"{api}/api/v2/dags/bert_distillation/dagRuns", token=token)[1]["total_entries"] == 0

    status, run = _call("POST", f"{api}/api/v2/dags/bert_distillation/dagRuns",
                        {"logical_date": None, "conf": TINY}, token)
    assert status == 200, run
    deadline = time.monotonic() + 900
    while True:
        state = _call("GET", f"{api}/api/v2/dags/bert_distillation/dagRuns/{run['dag_run_id']}", token=token)[1][
            "state"]
        if state in ("success", "failed"):
            break
        assert time.monotonic() < deadline, "the run did not finish in 15 minutes"
        time.sleep(5)
    assert state == "success", (root / "airflow" / "logs").as_posix()
    # The student landed in the MLflow server's registry.
    status, found = _call("GET", f"{info['mlflow']}/api/2.0/mlflow/registered-models/alias?name={MODEL}"
                          "&alias=champion")
    assert status == 200 and found["model_version"]["version"] == "1"


def _mlflow(info: dict, path: str, body: dict | None = None) -> dict:
    status, found = _call("POST" if body is not None else "GET", f"{info['mlflow']}/api/2.0/mlflow/{path}", body)
    assert status == 200, found
    return found


def test_a_run_marked_failed_in_the_ui_leaves_no_mlflow_run_open(stack):
    """While adapt-teacher trains, a person marks the run failed: Airflow kills the step, the listener
    closes the pipeline's run KILLED and the step's run too. Checked through both servers' REST APIs."""
    info, _root = stack
    api = info["airflow"]
    token = _call("POST", f"{api}/auth/token", {"username": info["user"], "password": info["password"]})[1][
        "access_token"]
    status, run = _call("POST", f"{api}/api/v2/dags/bert_distillation/dagRuns",
                        {"logical_date": None, "conf": {**TINY, "adapt_steps": 100000, "force": True}}, token)
    assert status == 200, run
    runs_url = f"{api}/api/v2/dags/bert_distillation/dagRuns/{run['dag_run_id']}"
    experiment = _mlflow(info, "experiments/get-by-name?experiment_name=bertdistill")["experiment"]["experiment_id"]
    search = {"experiment_ids": [experiment], "filter": "attributes.status = 'RUNNING'", "max_results": 100}
    deadline = time.monotonic() + 600
    while not any(r["data"].get("tags") and {"key": "bertdistill.step", "value": "adapt-teacher"} in r["data"]["tags"]
                  for r in _mlflow(info, "runs/search", search).get("runs", [])):  # the step's run is open
        assert time.monotonic() < deadline, "adapt-teacher never started"
        assert _call("GET", runs_url, token=token)[1]["state"] in ("queued", "running")
        time.sleep(3)
    assert _call("PATCH", runs_url, {"state": "failed"}, token)[0] == 200
    deadline = time.monotonic() + 120
    while open_runs := _mlflow(info, "runs/search", search).get("runs", []):
        assert time.monotonic() < deadline, [r["info"]["run_name"] for r in open_runs]
        time.sleep(2)
    everything = _mlflow(info, "runs/search", {"experiment_ids": [experiment], "max_results": 1000})["runs"]
    parents = [r for r in everything if not any(t["key"] == "mlflow.parentRunId" for t in r["data"]["tags"])]
    killed = [r for r in parents if {"key": "airflow.run_id", "value": run["dag_run_id"]} in r["data"]["tags"]]
    assert [r["info"]["status"] for r in killed] == ["KILLED"]
    # Two pipeline runs, told apart by name, the finished one with its figures on the parent itself.
    assert len({r["info"]["run_name"] for r in parents}) == len(parents) == 2
    [finished] = [r for r in parents if r["info"]["status"] == "FINISHED"]
    metrics = {m["key"] for m in finished["data"]["metrics"]}
    assert {"student_mlm_accuracy", "teacher_mlm_accuracy", "baseline_mlm_accuracy"} <= metrics


def test_the_stack_listens_on_loopback_only(stack):
    _, root = stack
    pids = [int(p.read_text()) for p in (root / "airflow" / "pids").glob("*.pid")]
    assert len(pids) == 5
    listening = []
    for pid in pids:
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            try:
                listening += [c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                continue
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}
