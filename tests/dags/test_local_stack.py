"""`make up`'s stack, driven like a user's script would: REST API token, trigger with conf, success.

Airflow's api-server, scheduler (LocalExecutor), dag-processor and triggerer plus an MLflow
server, started by local_stack on free ports; only 127.0.0.1 is listened on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

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


def _token(info: dict) -> str:
    return _call("POST", f"{info['airflow']}/auth/token", {"username": info["user"],
                                                           "password": info["password"]})[1]["access_token"]


def _wait(what: str, check, timeout: float = 600, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)
    return found


def _pipeline_runs(info: dict, dag_run_id: str) -> tuple[list[dict], list[dict]]:
    """The MLflow parent run(s) of one Airflow run, and every run of the experiment still RUNNING."""
    experiment = _mlflow(info, "experiments/get-by-name?experiment_name=bertdistill")["experiment"]["experiment_id"]
    everything = _mlflow(info, "runs/search", {"experiment_ids": [experiment], "max_results": 1000}).get("runs", [])
    parents = [r for r in everything if {"key": "airflow.run_id", "value": dag_run_id} in r["data"]["tags"]]
    return parents, [r for r in everything if r["info"]["status"] == "RUNNING"]


def _closed(info: dict, dag_run_id: str) -> list[dict] | None:
    """The parent runs of this Airflow run once no run of the experiment is RUNNING any more."""
    parents, running = _pipeline_runs(info, dag_run_id)
    return parents if parents and not running else None


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _ended(api: str, token: str, url: str) -> dict | None:
    run = _call("GET", url, token=token)[1]
    return run if run["state"] in ("success", "failed") else None


def _states_stay(api: str, token: str, url: str, expected: str, seconds: float = 20) -> None:
    """The run's state is `expected` and stays so (today's bug: it turned success seconds later)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = _call("GET", url, token=token)[1]["state"]
        assert state == expected, f"{url}: {state}"
        time.sleep(2)


def _reported(api: str, token: str, dag_run_id: str, map_index: int) -> bool:
    """Whether make_examples[map_index]'s own runner reported success (Airflow's audit log): a shard that
    finished before the click reached the scheduler keeps its success."""
    query = urllib.parse.urlencode({"dag_id": "bert_distillation", "run_id": dag_run_id, "task_id": "make_examples",
                                    "map_index": map_index, "event": "success"})
    return _call("GET", f"{api}/api/v2/eventLogs?{query}", token=token)[1]["total_entries"] > 0


def test_a_run_marked_failed_mid_step_ends_failed_in_airflow_and_closed_in_mlflow(stack):
    """While make-examples runs, one shard done and another in progress, a person marks the run failed
    through the REST API (what the UI's button calls): Airflow shows the run failed and keeps it so, the
    shard that had finished keeps its success, the running one failed; MLflow closes the pipeline's run
    KILLED, the step's too, and no run of the experiment is left RUNNING."""
    info, _root = stack
    api, token = info["airflow"], _token(info)
    conf = {**TINY, "train_shards": 3, "dupe_factor": 5, "force": True}
    status, run = _call("POST", f"{api}/api/v2/dags/bert_distillation/dagRuns", {"logical_date": None,
                                                                                   "conf": conf}, token)
    assert status == 200, run
    url = f"{api}/api/v2/dags/bert_distillation/dagRuns/{run['dag_run_id']}"

    def one_done_one_early() -> dict | None:
        """One shard done and another running with more than half of a shard's time still ahead of it,
        so the click lands while it runs (a shard that had just begun to end made CI's run flaky)."""
        mapped = _call("GET", f"{url}/taskInstances/make_examples/listMapped", token=token)[1]
        tis = mapped.get("task_instances", [])
        assert "failed" not in {ti["state"] for ti in tis}, tis
        took = [ti["duration"] for ti in tis if ti["state"] == "success" and ti["duration"]]
        now = datetime.now(UTC)
        early = [ti for ti in tis if ti["state"] == "running" and ti["start_date"] and took and
                 (now - datetime.fromisoformat(ti["start_date"])).total_seconds() < min(took) / 2]
        return {ti["map_index"]: ti["state"] for ti in tis} if early else None

    before = _wait("a make-examples shard done while another has just begun", one_done_one_early, every=0.3)
    assert _call("PATCH", url, {"state": "failed"}, token)[0] == 200
    _states_stay(api, token, url, "failed")
    after = {ti["map_index"]: ti["state"] for ti in
             _call("GET", f"{url}/taskInstances/make_examples/listMapped", token=token)[1]["task_instances"]}
    for index, state in before.items():
        if state == "success":
            assert after[index] == "success", (before, after)
        if state == "running":
            assert after[index] == ("success" if _reported(api, token, run["dag_run_id"], index) else "failed"), (
                before, after)
    assert "failed" in after.values(), (before, after)
    assert "publish" not in {ti["task_id"] for ti in _call("GET", f"{url}/taskInstances", token=token)[1][
        "task_instances"] if ti["state"] == "success"}
    parents = _wait("MLflow closed", lambda: _closed(info, run["dag_run_id"]), timeout=120)
    assert [p["info"]["status"] for p in parents] == ["KILLED"]
    assert "marked failed by hand" in _tags(parents[0])["bertdistill.stopped"]


def test_a_second_run_of_the_same_settings_says_it_did_nothing(stack):
    """The run succeeds at check_dump and its note (shown in the grid and the run's page) names the dump
    already published and the model it produced."""
    info, _root = stack
    api, token = info["airflow"], _token(info)
    status, run = _call("POST", f"{api}/api/v2/dags/bert_distillation/dagRuns", {"logical_date": None,
                                                                                   "conf": TINY}, token)
    assert status == 200, run
    url = f"{api}/api/v2/dags/bert_distillation/dagRuns/{run['dag_run_id']}"
    done = _wait("the no-op run ended", lambda: _ended(api, token, url), timeout=300)
    assert done["state"] == "success"
    assert done["note"].startswith("Nothing to do: enwiki 20160101 was already distilled and published"), done
    assert f"as {MODEL} version 1;" in done["note"] and "set force" in done["note"]


def test_unpausing_the_monthly_dag_starts_a_demo_sized_run_and_a_paused_run_marked_failed_ends(stack):
    """make up gives the monthly DAG make demo's sizes: unpausing it starts one run of minutes. Paused
    again with that run in flight, the run goes on (pausing stops nothing); marked failed, it ends failed
    in Airflow (no teardown left waiting on a paused DAG's scheduling) and KILLED in MLflow."""
    from bertdistill.orchestration.plan import DEMO

    info, _root = stack
    api, token = info["airflow"], _token(info)
    dag = f"{api}/api/v2/dags/bert_distillation_monthly"
    _wait("the monthly DAG parsed", lambda: _call("GET", dag, token=token)[0] == 200, timeout=180)
    assert _call("PATCH", dag, {"is_paused": False}, token)[0] == 200
    [run] = _wait("the scheduled run", lambda: _call("GET", f"{dag}/dagRuns", token=token)[1]["dag_runs"],
                  timeout=180)
    assert run["run_type"] == "scheduled"
    url = f"{dag}/dagRuns/{run['dag_run_id']}"
    xcom = f"{url}/taskInstances/check_dump/xcomEntries/return_value"
    plan = _wait("check_dump's plan", lambda: _call("GET", xcom, token=token)[1].get("value"), timeout=300)
    plan = plan if isinstance(plan, dict) else json.loads(plan)
    assert plan["params"]["size"] == "demo"
    assert {k: plan["params"][k] for k in DEMO} == DEMO  # minutes on a laptop, not the full defaults
    _wait("a step of the monthly run started", lambda: _pipeline_runs(info, run["dag_run_id"])[0], timeout=300)
    assert _call("PATCH", dag, {"is_paused": True}, token)[0] == 200
    assert _call("GET", url, token=token)[1]["state"] == "running"
    assert _call("PATCH", url, {"state": "failed"}, token)[0] == 200
    _states_stay(api, token, url, "failed")
    parents = _wait("MLflow closed", lambda: _closed(info, run["dag_run_id"]), timeout=120)
    assert [p["info"]["status"] for p in parents] == ["KILLED"]


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
