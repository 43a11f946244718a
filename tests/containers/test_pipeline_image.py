"""Every step pod of the DAG, run in the pipeline image under the exact pod spec the DAG sends.

The pods come from the DAG's own code: plan.py's arguments and runners.pod_kwargs, turned into
a Pod by the provider's KubernetesPodOperator.build_pod_request_obj, then run by podman as a
kubelet would (user 10001, read-only root, ALL capabilities dropped, no-new-privileges, the
scratch emptyDir, the env and the Secret's keys). The store is a real S3 server (SeaweedFS),
the dump mirror and the teacher are served over HTTP, MLflow is a real `mlflow server`; all on
127.0.0.1, which the containers reach through the host's network. The same arguments run as
local processes against a local folder; every output file must be byte-identical.
distill runs as an MPIJob (test_mpijob.py); here it runs locally between label-teacher and
evaluate, so that evaluate and publish have a student.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli
from tests.containers.engine import run_pod
from tests.dags.test_dag_run import TINY

pytest.importorskip("airflow")
DATE = "20160101"


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample, hf_teacher):
    """The sample's dump mirror and the teacher (zipped, as Google publishes BERT) over HTTP."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(sample / "mirror", root / "mirror")
    shutil.make_archive(str(root / "tiny-bert"), "zip", hf_teacher.parent, hf_teacher.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", (root / "artifacts").as_uri()],
                            stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        time.sleep(1)
    else:
        proc.kill()
        raise AssertionError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _settings(store: str, served: str, mlflow: str, s3_env: dict):
    from bertdistill.orchestration.settings import Settings

    return Settings(mode="kubernetes", store=store, mirror=f"{served}/mirror", teacher=f"{served}/tiny-bert.zip",
                    mlflow_uri=mlflow, s3_endpoint_url=s3_env.get("BERTDISTILL_S3_ENDPOINT_URL", ""))


def _pod(settings, task_id: str, arguments: list[str]) -> dict:
    """The Pod the DAG's task would create, built by the provider's operator from the DAG's kwargs."""
    from kubernetes.client import ApiClient

    from bertdistill.orchestration.pods import StepPodOperator
    from bertdistill.orchestration.runners import StepOperators, pod_kwargs

    env = {**StepOperators(settings).env(), "BERTDISTILL_PARENT_RUN_ID": ""}
    op = StepPodOperator(task_id=task_id, arguments=arguments, **pod_kwargs(settings, task_id, env))
    op.name = f"bertdistill-{task_id.replace('_', '-')}"
    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj())


def _on_cpu(pod: dict, images: dict[str, str]) -> dict:
    """A GPU step's pod with the CPU build of the pipeline image: the GPU build (CUDA wheels, several GB)
    is not built on these machines, which have no GPU; everything else in the spec stays."""
    import copy

    pod = copy.deepcopy(pod)
    for container in pod["spec"]["containers"]:
        if container["image"].endswith("-gpu"):
            container["image"] = images["pipeline"]
            for limits in (container["resources"].get("requests", {}), container["resources"].get("limits", {})):
                limits.pop("nvidia.com/gpu", None)
    return pod


def _steps(plan, settings) -> list:
    """(task id, arguments) of every pod step in the DAG's order, from the DAG's own functions."""
    from bertdistill.orchestration import step_args, tasks

    steps = [("fetch_dump", step_args.fetch_dump_args(plan, settings.mirror))]
    steps.append(("extract", lambda: tasks.dump_files(plan)))
    steps.append(("build_corpus", lambda: tasks.corpus(plan)))
    steps.append(("fetch_teacher", step_args.fetch_teacher_args(plan)))
    steps.append(("make_examples", lambda: tasks.example_shards(plan)))
    steps.append(("adapt_teacher", step_args.adapt_teacher_args(plan)))
    steps.append(("label_teacher", lambda: step_args.label_teacher_args(plan, plan.adapted_teacher)))
    steps.append(("distill", step_args.distill_args(plan, plan.adapted_teacher)))
    steps.append(("evaluate", step_args.evaluate_args(plan, plan.adapted_teacher)))
    steps.append(("publish", step_args.publish_args(plan)))
    return steps


def _expand(arguments) -> list[list[str]]:
    found = arguments() if callable(arguments) else arguments
    return found if found and isinstance(found[0], list) else [found]


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory):
    """The pod operator reads a cluster config while it builds a Pod; nothing is sent to it."""
    import os

    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                    "users: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
                    "current-context: c\n")
    name = "AIRFLOW_CONN_KUBERNETES_DEFAULT"  # the connection the operator's hook reads, at call time
    saved = os.environ.get(name)
    os.environ[name] = json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(path)}})
    yield path
    if saved is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = saved


@pytest.fixture(scope="module")
def pipeline_runs(images, served, mlflow_server, seaweed, kubeconfig, tmp_path_factory):
    """The DAG's steps twice: as pods in the pipeline image on S3, and as local processes on a folder."""
    import os

    from bertdistill.orchestration import plan as planning

    root = tmp_path_factory.mktemp("k8s-pods")
    s3_store = f"s3://bertdistill-test/pods-{time.time_ns()}"
    secrets = {"bertdistill-s3": {k: v for k, v in seaweed.items() if k.startswith("AWS_")}}
    saved = {k: os.environ.get(k) for k in seaweed}
    os.environ.update(seaweed)  # the DAG's own tasks (dump_arguments) read manifests from the store
    try:
        pods, local = [], []
        for store, in_pods in ((s3_store, True), (str(root / "local"), False)):
            settings = _settings(store, served, mlflow_server, seaweed)
            plan = planning.make_plan(TINY, settings, DATE)
            for task_id, arguments in _steps(plan, settings):
                for args in _expand(arguments):
                    if in_pods and task_id != "distill":
                        pod = _pod(settings, task_id, args)
                        proc = run_pod(_on_cpu(pod, images), secrets=secrets, volumes_root=root)
                        pods.append((task_id, pod, proc))
                    else:
                        env = {**seaweed, **settings.step_env(), "BERTDISTILL_SCRATCH": str(root / "scratch")}
                        proc = run_cli(*args, env=env, timeout=600)
                        if not in_pods:
                            local.append((task_id, proc))
                    assert proc.returncode == 0, f"{task_id} {args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        yield {"pods": pods, "local": local, "s3": s3_store, "local_store": root / "local", "root": root,
               "secrets": secrets, "settings": _settings(s3_store, served, mlflow_server, seaweed)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_step_pod_runs_in_the_pipeline_image_as_its_spec_says(pipeline_runs):
    pods = pipeline_runs["pods"]
    ran = [task_id for task_id, _, _ in pods]
    assert sorted(set(ran)) == ["adapt_teacher", "build_corpus", "evaluate", "extract", "fetch_dump",
                                "fetch_teacher", "label_teacher", "make_examples", "publish"]
    assert ran.count("make_examples") == ran.count("label_teacher") == 3  # 2 train + 1 held-out shards
    for task_id, pod, proc in pods:
        [container] = pod["spec"]["containers"]
        assert container["image"] == ("bertdistill/pipeline:0.1.0-gpu" if task_id in ("adapt_teacher",
                                                                                      "label_teacher")
                                      else "bertdistill/pipeline:0.1.0")
        sc = container["securityContext"]
        assert sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
        assert "error:" not in proc.stderr, proc.stderr[-2000:]


def test_pod_outputs_are_byte_identical_to_the_local_run(pipeline_runs, seaweed):
    from tests.conftest import _s3_client

    bucket, _, prefix = pipeline_runs["s3"].removeprefix("s3://").partition("/")
    client = _s3_client(seaweed)
    remote = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            remote[item["Key"][len(prefix) + 1:]] = item["Key"]
    local_root: Path = pipeline_runs["local_store"]
    local = {str(p.relative_to(local_root)): p for p in local_root.rglob("*") if p.is_file()}
    compared = sorted(k for k in remote if not k.rsplit("/", 1)[-1].startswith("_MANIFEST") and "/students/" not in k)
    assert set(compared) <= set(local), sorted(set(compared) - set(local))
    kinds = {k.split("/")[2] if k.startswith("runs/") else k.split("/")[0] for k in compared}
    assert {"dumps", "teachers", "articles", "text", "examples", "labels"} <= kinds, kinds
    different = [k for k in compared if client.get_object(Bucket=bucket, Key=remote[k])["Body"].read()
                 != local[k].read_bytes()]
    assert different == [], different


def test_evaluate_and_publish_reached_mlflow_from_their_pods(pipeline_runs, mlflow_server):
    import mlflow

    from bertdistill.orchestration import plan as planning

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    model = planning.make_plan(TINY, pipeline_runs["settings"], DATE).model_name
    assert model.startswith("bertdistill-enwiki-")  # the DAG's name for this kind of student
    version = client.get_model_version_by_alias(model, "champion")
    assert int(version.version) >= 1
    [publish] = [proc for task_id, _, proc in pipeline_runs["pods"] if task_id == "publish"]
    assert "champion" in publish.stdout + publish.stderr


def test_without_its_scratch_volume_a_step_says_so_in_one_error_line(pipeline_runs):
    """The image's /scratch is read-only under a read-only root: the step names the folder and the fix."""
    from bertdistill.orchestration import plan as planning
    from bertdistill.orchestration import step_args

    settings = pipeline_runs["settings"]
    plan = planning.make_plan(TINY, settings, DATE)
    pod = _pod(settings, "fetch_teacher", [*step_args.fetch_teacher_args(plan), "--force"])
    [container] = pod["spec"]["containers"]
    container.pop("volumeMounts")
    pod["spec"].pop("volumes")
    proc = run_pod(pod, secrets=pipeline_runs["secrets"], volumes_root=pipeline_runs["root"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/scratch is not writable" in errors[0] and "emptyDir" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
