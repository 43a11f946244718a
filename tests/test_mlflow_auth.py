"""Only the pipeline may move the champion: a real `mlflow server --app-name basic-auth` on 127.0.0.1,
started the way the chart starts it (orchestration/mlflow_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bertdistill.orchestration.mlflow_server import api
from tests.conftest import free_port, run_cli

pytest.importorskip("flask_wtf")  # mlflow[auth]
pytestmark = pytest.mark.slow

ADMIN = ("admin", "admin-pass-1234")
PIPELINE = ("pipeline", "pipeline-pass-1234")
READER = ("reader", "reader-pass-1234")
MODEL = "bertdistill-auth-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    (root / "auth.ini").write_text(f"""[mlflow]
default_permission = READ
database_uri = sqlite:///{root}/basic_auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
""")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "BERTDISTILL_PIPELINE_USERNAME": PIPELINE[0],
           "BERTDISTILL_PIPELINE_PASSWORD": PIPELINE[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"}
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "bertdistill.orchestration.mlflow_server", "--", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while "pipeline user 'pipeline' created" not in (root / "server.log").read_text():
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the server did not set up the pipeline user in 240 s"
        time.sleep(1)
    base = f"http://127.0.0.1:{port}"
    assert api(base, "/api/2.0/mlflow/users/create", {"username": READER[0], "password": READER[1]}, *ADMIN)[0] == 200
    yield base
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)
    log.close()


def _anonymous(base: str, path: str, body: dict) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_pipeline_publishes_and_nobody_else_moves_the_champion(server, tiny_teacher, tiny_student, labelled,
                                                                   tmp_path):
    env = {"MLFLOW_TRACKING_URI": server, "MLFLOW_TRACKING_USERNAME": PIPELINE[0],
           "MLFLOW_TRACKING_PASSWORD": PIPELINE[1], "MLFLOW_EXPERIMENT_NAME": "bertdistill"}
    # publish writes published/ into the student folder: a copy, so other tests keep theirs
    import shutil

    student, report = tmp_path / "student", tmp_path / "report"
    shutil.copytree(tiny_student, student, ignore=shutil.ignore_patterns("published"))
    run_cli("evaluate", "--teacher", str(tiny_teacher), "--student", str(student), "--heldout",
            str(labelled.parent), "--output", str(report), "--max-examples", "128", "--latency-batch", "2",
            env=env, check=True)
    proc = run_cli("publish", "--student", str(student), "--report", str(report), "--model-name", MODEL, env=env,
                   check=True)
    assert "is the new champion" in proc.stdout
    alias = {"name": MODEL, "alias": "champion", "version": "1"}
    # Nobody without a user may write: not a new model, not the alias.
    assert _anonymous(server, "/api/2.0/mlflow/registered-models/create", {"name": "intruder"}) == 401
    assert _anonymous(server, "/api/2.0/mlflow/registered-models/alias", alias) == 401
    assert api(server, "/api/2.0/mlflow/registered-models/alias", alias, ADMIN[0], "wrong-password")[0] == 401
    # A person with a user browses the pipeline's model but cannot move its alias.
    status, found = api(server, f"/api/2.0/mlflow/registered-models/get?name={MODEL}", {}, *READER, method="GET")
    assert status == 200 and found["registered_model"]["aliases"][0]["alias"] == "champion"
    status, answer = api(server, "/api/2.0/mlflow/registered-models/alias", alias, *READER)
    assert status == 403, answer
    status, answer = api(server, "/api/2.0/mlflow/registered-models/delete-alias", {"name": MODEL,
                                                                                   "alias": "champion"}, *READER,
                         method="DELETE")
    assert status == 403, answer
    # The pipeline, which owns the model, may.
    assert api(server, "/api/2.0/mlflow/registered-models/alias", alias, *PIPELINE)[0] == 200
