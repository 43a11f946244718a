"""The Kubeflow MPIJob (v2beta1) that runs distill, and the NetworkPolicy around it: plain dicts.

Pure functions of the settings and arguments, apart from mpijob.py (which creates, follows and
deletes them through the API), so the body can be validated and run as containers by the tests
without an API server. Wired as the MPI Operator v2 expects: workers start the trainer image's
sshd (the operator would otherwise start a root sshd on port 22) and are Ready once it listens;
the launcher is created only when every worker is Ready (their DNS names resolve only then), and
the job is bounded by a deadline and removed after a TTL even if nobody follows it any more.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from bertdistill.orchestration.runners import (
    SCRATCH,
    container_resources,
    scratch_volume,
    secret_env,
    security_context,
)
from bertdistill.orchestration.settings import Settings

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v2beta1", "mpijobs", "MPIJob"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the MPI Operator puts it on the job's launcher and workers
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
SSH_DIR = "/home/bertdistill/.ssh"
SSH_PORT = 2222
# What each rank needs from the launcher's environment (mpirun -x): the image's PATH (an ssh
# session has sshd's own), the S3 credentials and the pipeline's MLflow user from the Secrets,
# and the scratch folders.
FORWARDED = ("PATH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "BERTDISTILL_SCRATCH",
             "HOME", "TMPDIR")
MLFLOW_USER = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # forwarded when its Secret is set
FINISHED_TTL = timedelta(hours=1)


def label_value(text: str) -> str:
    """A valid label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(text))[:63].strip("-._") or "none"


def ti_labels(context: dict[str, Any]) -> dict[str, str]:
    ti = context["ti"]
    labels = {"airflow.apache.org/dag_id": label_value(ti.dag_id),
              "airflow.apache.org/task_id": label_value(ti.task_id),
              "airflow.apache.org/run_id": label_value(ti.run_id),
              "airflow.apache.org/try_number": label_value(ti.try_number)}
    if getattr(ti, "map_index", -1) >= 0:
        labels["airflow.apache.org/map_index"] = str(ti.map_index)
    return labels


def mpirun_command(workers: int, arguments: Sequence[str], env: dict[str, str], also: Sequence[str] = ()
                   ) -> list[str]:
    """The launcher's command: one rank per worker slot, the environment every rank needs forwarded."""
    forwarded = sorted({*env, *FORWARDED, *also})
    return ["mpirun", "-np", str(workers), "--bind-to", "none", "--map-by", "slot",
            *[flag for name in forwarded for flag in ("-x", name)], "bertdistill", *arguments]


def mpijob_body(name: str, settings: Settings, workers: int, arguments: Sequence[str], env: dict[str, str],
                resources: dict[str, str], labels: dict[str, str], deadline: timedelta) -> dict[str, Any]:
    """The MPIJob: one launcher running mpirun, `workers` workers of one slot each, all from the trainer image."""
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    env = {**env, "BERTDISTILL_SCRATCH": SCRATCH, "HOME": SCRATCH, "TMPDIR": SCRATCH}
    image = settings.trainer_gpu_image if "gpu" in resources else settings.trainer_image

    def template(role: str, command: list[str], wanted: dict[str, str], **extra: Any) -> dict[str, Any]:
        container = k8s.V1Container(
            name=role, image=image, command=command,
            env=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
            env_from=secret_env(settings),
            resources=container_resources(wanted, settings.gpu_resource),
            # workers' sshd and OpenMPI's daemons write the home folder and /tmp
            security_context=security_context(read_only_root=role == "launcher"),
            volume_mounts=[k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)], **extra)
        spec = k8s.V1PodSpec(containers=[container], service_account_name=settings.service_account,
                             automount_service_account_token=False,
                             volumes=[scratch_volume(wanted.get("scratch"))])
        pod = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=spec)
        return ApiClient().sanitize_for_serialization(pod)

    listening = k8s.V1Probe(tcp_socket=k8s.V1TCPSocketAction(port=SSH_PORT), period_seconds=2)
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "slotsPerWorker": 1,
            "sshAuthMountPath": SSH_DIR,  # the trainer image's non-root user
            "mpiImplementation": "OpenMPI",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0,
                          "activeDeadlineSeconds": int(deadline.total_seconds()),
                          "ttlSecondsAfterFinished": int(FINISHED_TTL.total_seconds())},
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never",
                             "template": template("launcher", mpirun_command(workers, arguments, env,
                                                                 MLFLOW_USER if settings.mlflow_secret else ()),
                                                  {"cpu": "1", "memory": "1Gi", "scratch": "1Gi"})},
                "Worker": {"replicas": workers, "restartPolicy": "Never",
                           "template": template("worker", ["start-sshd"], resources, readiness_probe=listening)},
            },
        },
    }


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def outcome(job: dict[str, Any]) -> dict[str, Any] | None:
    """{"type": "Succeeded"|"Failed", reason, message} once the job has finished, else None."""
    for kind in ("Succeeded", "Failed"):
        found = condition(job, kind)
        if found:
            return {"type": kind, "reason": found.get("reason", ""), "message": found.get("message", "")}
    return None


def isolation_policy(name: str, namespace: str, uid: str | None) -> dict[str, Any]:
    """The NetworkPolicy that lets one MPIJob's pods reach each other (the workers' sshd on 2222,
    OpenMPI's daemons, Horovod's rings) and nothing else reach them, past the chart's default
    deny. Owned by the job (when its uid is known), so it goes when the job does."""
    same_job = {"matchLabels": {JOB_NAME_LABEL: name}}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/name": "bertdistill",
                                           "app.kubernetes.io/component": "distill"}}
    if uid:
        metadata["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name, "uid": uid}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
            "spec": {"podSelector": same_job, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector":
                                                                                              same_job}]}]}}
