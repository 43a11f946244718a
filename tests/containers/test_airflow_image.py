"""The Airflow image: the DAG parses inside it, in the kubernetes mode it is deployed in."""

from __future__ import annotations

from tests.containers.engine import ROOT, podman


def test_the_dag_has_no_import_errors_inside_the_airflow_image(images):
    script = ("airflow db migrate >/dev/null && airflow dags list-import-errors --local -o json "
              "&& airflow dags list --local -o plain")
    proc = podman("run", "--rm", "--env", "BERTDISTILL_MODE=kubernetes", "--entrypoint", "bash", images["airflow"],
                  "-c", script, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[]" in proc.stdout or "No data found" in proc.stdout, proc.stdout
    assert "bert_distillation" in proc.stdout
    user = podman("run", "--rm", "--entrypoint", "id", images["airflow"], "-u").stdout.strip()
    assert user == "50000"


def test_the_charts_mlflow_pod_asks_for_a_user_and_lets_the_pipeline_in(images, tmp_path):
    """The MLflow Deployment the chart renders, run as a container from the image it names: the
    basic-auth app starts from the pod's own env (Secret keys) and config file (ConfigMap),
    sets up the pipeline's user, refuses anonymous writes and takes the pipeline's."""
    import json
    import os
    import time
    import urllib.error
    import urllib.request

    import pytest

    from bertdistill.orchestration.mlflow_server import api
    from tests.conftest import free_port
    from tests.containers.engine import pod_run_args

    helm = pytest.importorskip("helm_python")
    yaml = pytest.importorskip("yaml")
    port = free_port()
    values = {"s3": {"existingSecret": "s3"}, "images": {"mlflow": images["airflow"]},
              "mlflow": {"port": port, "auth": {"adminSecret": "admin", "pipelineSecret": "pipeline"}}}
    with helm.Chart.load(str(ROOT / "helm" / "bertdistill")) as chart:
        out = chart.render(values, name="bertdistill", namespace="bertdistill")
    objects = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    secrets = {"s3": {"AWS_ACCESS_KEY_ID": "unused", "AWS_SECRET_ACCESS_KEY": "unused"},
               "admin": {"username": "admin", "password": "admin-pass-1234", "flask-secret-key": "test-only"},
               "pipeline": {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "pipeline-pass-1234"}}
    name = f"bd-mlflow-{os.urandom(3).hex()}"
    args = pod_run_args({"metadata": {"name": "mlflow"}, "spec": deployment["spec"]["template"]["spec"]}, name=name,
                        secrets=secrets, volumes_root=tmp_path, config_maps=config_maps)
    podman(args[0], "-d", *args[1:])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            logs = podman("logs", name, check=False)
            if "pipeline user 'pipeline' created" in logs.stdout + logs.stderr:
                break
            state = podman("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
            assert state == "true", logs.stdout[-2000:] + logs.stderr[-2000:]
            assert time.monotonic() < deadline, logs.stdout[-2000:] + logs.stderr[-2000:]
            time.sleep(2)
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/registered-models/create",
                                         data=json.dumps({"name": "intruder"}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
            raise AssertionError("an anonymous request registered a model")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        status, answer = api(base, "/api/2.0/mlflow/registered-models/create", {"name": "bertdistill-x"},
                             "pipeline", "pipeline-pass-1234")
        assert status == 200, answer
    finally:
        podman("rm", "-f", "--ignore", name, check=False)
