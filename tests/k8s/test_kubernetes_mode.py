"""The DAG in kubernetes mode against the kmock API emulator, and every manifest it sends, validated.

The whole DAG runs under `airflow dags test` with BERTDISTILL_MODE=kubernetes: every step
becomes a KubernetesPodOperator pod and distill an MPIJob, sent to kmock; the stand-in
kubelet in cluster.py runs each pod's command locally. Checked: each pod's spec (image,
command, resources with a GPU for label-teacher, Secret-fed credentials, security context,
service account), that every pod and the MPIJob were deleted afterwards, that the MPIJob
was followed through its conditions, and that every Pod and the MPIJob's pod templates pass
`kubernetes-validate --strict` and the MPIJob the CRD's own schema. Not exercised: a real
scheduler, images, GPUs, the MPI operator's ssh wiring, RBAC enforcement.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bertdistill.orchestration.runners import RESOURCES
from tests.dags.test_dag_run import TINY, dags_test, run_env, tasks_run

pytest.importorskip("kmock")
pytest.importorskip("airflow")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytestmark = pytest.mark.slow

CRD = Path(__file__).resolve().parents[3] / "shared" / "k8s" / "kubeflow.org_mpijobs.yaml"
STEP_TASKS = {"fetch-dump", "extract", "build-corpus", "make-examples", "fetch-teacher", "adapt-teacher",
              "label-teacher", "evaluate", "publish"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.k8s.cluster import Cluster

    c = Cluster(tmp_path_factory.mktemp("scratch"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def k8s_env(cluster, airflow_env, tmp_path_factory):
    kubeconfig = cluster.kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    return {**airflow_env, "BERTDISTILL_MODE": "kubernetes",
            "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps({"conn_type": "kubernetes",
                                                           "extra": {"kube_config_path": str(kubeconfig)}})}


@pytest.fixture(scope="module")
def k8s_run(cluster, k8s_env, sample, hf_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("k8srun")
    env = {**run_env(k8s_env, sample, hf_teacher, str(root / "store"), root / "mlflow.db")}
    proc = dags_test(env, TINY)
    return root, proc


def _created(cluster, resource: str) -> list[dict]:
    k = cluster.kmock
    return [r.data for r in cluster.requests(k.action.CREATE, k.resource(resource))]


def test_the_dag_runs_every_step_as_a_pod_and_distill_as_an_mpijob(cluster, k8s_run):
    from tests.k8s.cluster import MPIJOBS, NETWORK_POLICIES, PODS

    root, proc = k8s_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "publish" in tasks_run(out), out[-5000:]
    # distill is mapped over the student and its no-teacher control; each is deferrable: it runs, defers to
    # the trigger, and resumes once (no retry hid a failure: try 1)
    assert out.count("running task <TaskInstance: bert_distillation.distill ") == 4, out[-5000:]
    pods = _created(cluster, PODS)
    by_step = {}
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["command"] == ["bertdistill"]
        by_step.setdefault(container["args"][0], []).append(pod)
    assert set(by_step) == STEP_TASKS
    assert len(by_step["make-examples"]) == len(by_step["label-teacher"]) == 3  # mapped: 2 train + 1 held-out
    for step, found in by_step.items():
        spec = found[0]["spec"]
        container = spec["containers"][0]
        gpu_step = step in ("label-teacher", "adapt-teacher")
        assert container["image"] == ("bertdistill/pipeline:0.1.0-gpu" if gpu_step else "bertdistill/pipeline:0.1.0")
        assert spec["serviceAccountName"] == "bertdistill-steps"
        assert container["envFrom"] == [{"secretRef": {"name": "bertdistill-s3"}}]
        assert not any(e["name"].startswith("AWS_") for e in container.get("env", []))  # secrets only via Secret
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert len(env["BERTDISTILL_PARENT_RUN_ID"]) == 32  # the rendered MLflow parent run id
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        gpu = container["resources"]["requests"].get("nvidia.com/gpu")
        assert (gpu == "1") == (step in ("label-teacher", "adapt-teacher")), step
        # scratch: an emptyDir no bigger than the ephemeral storage the pod asked for
        [volume] = [v for v in spec["volumes"] if v["name"] == "scratch"]
        scratch = volume["emptyDir"]["sizeLimit"]
        assert container["resources"]["requests"]["ephemeral-storage"] == scratch, step
        assert container["resources"]["limits"]["ephemeral-storage"] == scratch, step
        assert scratch == ("3Gi" if step == "make-examples" else RESOURCES[step.replace("-", "_")]["scratch"]), step
    # Every pod was deleted once it finished; the launcher pod belongs to the MPIJob's lifecycle.
    k = cluster.kmock
    deleted = {r.name for r in cluster.requests(k.action.DELETE, k.resource(PODS))}
    assert {p["metadata"]["name"] for p in pods} <= deleted
    jobs = sorted(_created(cluster, MPIJOBS), key=lambda j: j["metadata"]["labels"]["airflow.apache.org/map_index"])
    assert [j["metadata"]["labels"]["airflow.apache.org/map_index"] for j in jobs] == ["0", "1"]
    commands = [j["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"] for j in jobs]
    assert "--soft-mlm-weight" not in commands[0]
    control = commands[1]
    assert control[control.index("--soft-mlm-weight") + 1] == control[control.index("--soft-nsp-weight") + 1] == "0"
    assert control[control.index("--output") + 1] == commands[0][commands[0].index("--output") + 1] + "/control"
    # each MPIJob came with its own NetworkPolicy (its pods to each other, nothing else), removed with it
    policies = _created(cluster, NETWORK_POLICIES)
    assert sorted(p["metadata"]["name"] for p in policies) == sorted(j["metadata"]["name"] for j in jobs)
    for policy in policies:
        same = {"matchLabels": {"training.kubeflow.org/job-name": policy["metadata"]["name"]}}
        assert policy["spec"]["podSelector"] == same
        assert policy["spec"]["ingress"] == [{"from": [{"podSelector": same}]}]
    assert {p["metadata"]["name"] for p in policies} <= {
        r.name for r in cluster.requests(k.action.DELETE, k.resource(NETWORK_POLICIES))}
    job = jobs[0]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert worker["volumes"][0]["emptyDir"]["sizeLimit"] == RESOURCES["distill"]["scratch"]
    assert worker["containers"][0]["resources"]["requests"]["ephemeral-storage"] == RESOURCES["distill"]["scratch"]
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["command"][:3] == ["mpirun", "-np", "1"]
    assert launcher["command"][launcher["command"].index("bertdistill") + 1] == "distill"
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 1
    assert job["metadata"]["labels"]["airflow.apache.org/try_number"] == "1"
    assert job["spec"]["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] > 0 and job["spec"]["runPolicy"]["ttlSecondsAfterFinished"]
    assert "-x" in launcher["command"] and "PATH" in launcher["command"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["command"] == ["start-sshd"] and worker["readinessProbe"]["tcpSocket"]["port"] == 2222
    assert len(cluster.requests(k.action.FETCH, k.resource(MPIJOBS))) >= 1  # followed its conditions
    assert sorted(r.name for r in cluster.requests(k.action.DELETE, k.resource(MPIJOBS))) == sorted(
        j["metadata"]["name"] for j in jobs)
    assert "[launcher] distill: 4 steps" in out, out[-8000:]  # the launcher's log, copied into the task log
    assert list((root / "store" / "runs" / "enwiki-20160101" / "students").glob(
        "*/published/savedmodel/saved_model.pb"))


def test_every_manifest_sent_validates_strictly(cluster, k8s_run):
    from tests.k8s.cluster import MPIJOBS, PODS

    version = kubernetes_validate.latest_version()
    pods = _created(cluster, PODS)
    jobs = _created(cluster, MPIJOBS)
    assert pods and jobs
    for pod in pods:
        kubernetes_validate.validate(pod, version, strict=True)
    for job in jobs:
        for role, replica in job["spec"]["mpiReplicaSpecs"].items():
            template = replica["template"]
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role.lower()}", **template["metadata"]},
                   "spec": template["spec"]}
            kubernetes_validate.validate(pod, version, strict=True)


def test_the_mpijob_satisfies_the_crd_schema(cluster, k8s_run):
    """Against the MPI Operator's own CRD (v2beta1 openAPIV3Schema), kept beside the repository as
    reference data, not in it: BERTDISTILL_MPIJOB_CRD or ../shared/k8s/kubeflow.org_mpijobs.yaml."""
    import os

    import jsonschema
    import yaml

    from tests.k8s.cluster import MPIJOBS

    path = Path(os.environ.get("BERTDISTILL_MPIJOB_CRD", CRD))
    if not path.is_file():
        pytest.skip(f"the MPIJob CRD is not at {path} (set BERTDISTILL_MPIJOB_CRD to kubeflow.org_mpijobs.yaml)")
    crd = yaml.safe_load(path.read_text())
    [schema] = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    jobs = _created(cluster, MPIJOBS)
    assert jobs
    for job in jobs:
        jsonschema.validate(job, schema)
    broken = {**jobs[0], "spec": {**jobs[0]["spec"], "mpiImplementation": "LAM"}}
    with pytest.raises(jsonschema.ValidationError):  # the schema really constrains what we send
        jsonschema.validate(broken, schema)


def test_a_failed_mpijob_fails_the_task_and_is_deleted(cluster, k8s_env, monkeypatch, tmp_path):
    """distill with a teacher that is not there: the launcher exits 2, the job reports Failed."""
    from airflow.sdk.exceptions import AirflowException

    from bertdistill.orchestration.mpijob import MPIJobOperator
    from bertdistill.orchestration.settings import Settings
    from tests.k8s.cluster import MPIJOBS

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", k8s_env["AIRFLOW_CONN_KUBERNETES_DEFAULT"])
    op = MPIJobOperator(task_id="distill", arguments=["distill", "--teacher", str(tmp_path / "none"), "--labels",
                                                       str(tmp_path), "--output", str(tmp_path / "student")],
                        workers=2, settings=Settings(mode="kubernetes"), env_vars={}, worker_resources={
                            "cpu": "1", "memory": "1Gi"}, poll_interval=0.2)
    ti = SimpleNamespace(dag_id="bert_distillation", task_id="distill", run_id="manual__x", map_index=-1,
                         try_number=1)
    with pytest.raises(AirflowException, match="failed: MPIJobFailed launcher exited 2"):
        op.execute({"ti": ti})
    k = cluster.kmock
    name = op.job_name
    assert name and name in [r.name for r in cluster.requests(k.action.DELETE, k.resource(MPIJOBS))]
    [body] = [r.data for r in cluster.requests(k.action.CREATE, k.resource(MPIJOBS)) if r.data["metadata"]["name"]
              == name]
    assert body["metadata"]["labels"]["airflow.apache.org/run_id"] == "manual__x"
    assert body["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 2



EXIT_CODE_DAG = '''
import json, os
from datetime import timedelta

import pendulum
from airflow.sdk import dag

from bertdistill.orchestration.runners import StepOperators
from bertdistill.orchestration.settings import Settings


@dag(dag_id="one_step", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     default_args={"retries": 1, "retry_delay": timedelta(seconds=1)})
def one_step():
    StepOperators(Settings.load()).single(os.environ["ONE_STEP_TASK"], json.loads(os.environ["ONE_STEP_ARGS"]))


one_step()
'''


@pytest.mark.parametrize(("task_id", "arguments", "code", "tries"), [
    # bad input: the teacher source does not exist -> exit 2, failed at once
    ("fetch_teacher", ["fetch-teacher", "--source", "/nowhere/teacher.zip", "--output", "/scratch/t"], 2, 1),
    # an S3 endpoint that does not answer -> exit 1 (transient), retried
    ("build_corpus", ["build-corpus", "--input", "s3://bucket/articles", "--output", "s3://bucket/text",
                      "--s3-endpoint-url", "http://127.0.0.1:9"], 1, 2),
])
def test_a_pod_that_refuses_its_input_fails_once_and_a_transient_failure_is_retried(
        cluster, k8s_env, tmp_path, monkeypatch, task_id, arguments, code, tries):
    """The DAG's own pod factory (StepOperators) in a one-task DAG with one retry, under `airflow dags test`."""
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}.items():
        monkeypatch.setenv(key, value)  # what the Secret gives the pod (the stand-in kubelet reads this process's)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "one_step.py").write_text(EXIT_CODE_DAG)
    env = {**k8s_env, "AIRFLOW__CORE__DAGS_FOLDER": str(dags), "ONE_STEP_TASK": task_id,
           "ONE_STEP_ARGS": json.dumps(arguments)}
    import subprocess

    from tests.conftest import airflow_bin

    proc = subprocess.run([airflow_bin(), "dags", "test", "one_step"], env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count(f"running task <TaskInstance: one_step.{task_id} ") == tries, out[-5000:]
    pods = [r.data for r in cluster.requests(cluster.kmock.action.CREATE, cluster.kmock.resource("v1/pods"))
            if r.data["spec"]["containers"][0].get("args") == arguments]
    assert len(pods) == tries  # each try ran its own pod
    assert ("refused its input (exit 2; not retried)" in out) == (code == 2), out[-5000:]
    assert f"'exit_code': {code}," in out, out[-5000:]
