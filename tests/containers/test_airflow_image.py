"""The Airflow image: the DAG parses inside it, in the kubernetes mode it is deployed in."""

from __future__ import annotations

from tests.containers.engine import podman


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
