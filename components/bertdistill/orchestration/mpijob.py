"""distill on Kubernetes: a Kubeflow MPIJob (v2beta1) running `mpirun ... bertdistill distill`.

Lifecycle, after the cncf provider's custom-resource operator: name the job after the task
with a random suffix; put the task instance's labels on the job and on both pod templates;
adopt a job of the same task instance left by an earlier try instead of starting another;
create it (retrying a name clash); follow its conditions until Succeeded or Failed while
copying the launcher pod's new log lines into the task log; decide success from the
conditions, never from a pod being gone; delete the job on success, failure or kill.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from bertdistill.orchestration.runners import SCRATCH, container_resources, security_context
from bertdistill.orchestration.settings import Settings

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v2beta1", "mpijobs", "MPIJob"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
SSH_DIR = "/home/bertdistill/.ssh"
FORWARDED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "BERTDISTILL_SCRATCH", "HOME",
             "TMPDIR")


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


def mpijob_body(name: str, settings: Settings, workers: int, arguments: Sequence[str], env: dict[str, str],
                resources: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
    """The MPIJob: one launcher running mpirun, `workers` workers of one slot each, all from the trainer image."""
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    env = {**env, "BERTDISTILL_SCRATCH": SCRATCH, "HOME": SCRATCH, "TMPDIR": SCRATCH}
    forwarded = sorted({*env, *FORWARDED})
    mpirun = ["mpirun", "-np", str(workers), "--bind-to", "none", "--map-by", "slot",
              *[flag for name in forwarded for flag in ("-x", name)], "bertdistill", *arguments]

    def template(role: str, command: list[str] | None, wanted: dict[str, str]) -> dict[str, Any]:
        container = k8s.V1Container(
            name=role, image=settings.trainer_image, command=command,
            env=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.s3_secret))],
            resources=container_resources(wanted, settings.gpu_resource),
            security_context=security_context(read_only_root=role == "launcher"),
            volume_mounts=[k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)])
        spec = k8s.V1PodSpec(containers=[container], service_account_name=settings.service_account,
                             volumes=[k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource())])
        pod = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=spec)
        return ApiClient().sanitize_for_serialization(pod)

    launcher_resources = {"cpu": "1", "memory": "1Gi"}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "slotsPerWorker": 1,
            "sshAuthMountPath": SSH_DIR,  # the trainer image's non-root user
            "mpiImplementation": "OpenMPI",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "Never",
                             "template": template("launcher", mpirun, launcher_resources)},
                "Worker": {"replicas": workers, "restartPolicy": "Never",
                           "template": template("worker", None, resources)},
            },
        },
    }


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


class MPIJobOperator(BaseOperator):
    """Runs `bertdistill <arguments>` under mpirun in an MPIJob and waits for its outcome."""

    template_fields: Sequence[str] = ("arguments", "workers", "env_vars")
    ui_color = "#e4ecf7"

    def __init__(self, *, arguments: list[str], workers: int | str, settings: Settings, env_vars: dict[str, str],
                 worker_resources: dict[str, str], kubernetes_conn_id: str = "kubernetes_default",
                 poll_interval: float = 10.0, startup_timeout: float = 1800.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.arguments, self.workers, self.env_vars = arguments, workers, env_vars
        self.settings, self.worker_resources = settings, worker_resources
        self.kubernetes_conn_id, self.poll_interval, self.startup_timeout = (kubernetes_conn_id, poll_interval,
                                                                             startup_timeout)
        self.job_name: str | None = None

    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id)

    def execute(self, context: Any) -> None:
        from airflow.sdk.exceptions import AirflowException

        hook = self.hook()
        labels = {"app.kubernetes.io/name": "bertdistill", "app.kubernetes.io/component": "distill",
                  **ti_labels(context)}
        self.job_name = self._adopt(hook, labels) or self._create(hook, labels)
        try:
            outcome = self._wait(hook)
        finally:
            self._delete(hook)
        if outcome["type"] == "Failed":
            raise AirflowException(f"MPIJob {self.job_name} failed: {outcome.get('reason', '')} "
                                   f"{outcome.get('message', '')}".strip())
        self.log.info("MPIJob %s succeeded", self.job_name)

    def on_kill(self) -> None:
        if self.job_name:
            self._delete(self.hook())

    # -- lifecycle -----------------------------------------------------------------------------
    def _adopt(self, hook, labels: dict[str, str]) -> str | None:
        """The name of a job this task instance created in an earlier try that is still there."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items() if not k.endswith("try_number"))
        found = hook.custom_object_client.list_namespaced_custom_object(
            GROUP, VERSION, self.settings.namespace, PLURAL, label_selector=selector).get("items", [])
        live = sorted((j for j in found if not condition(j, "Failed")),
                      key=lambda j: j["metadata"].get("creationTimestamp", ""))
        if live:
            if len(live) > 1:
                self.log.warning("%d MPIJobs match this task instance; adopting the newest", len(live))
            self.log.info("adopting MPIJob %s from an earlier try", live[-1]["metadata"]["name"])
            return live[-1]["metadata"]["name"]
        return None

    def _create(self, hook, labels: dict[str, str]) -> str:
        from kubernetes.client.exceptions import ApiException

        base = label_value(f"bertdistill-{self.task_id.replace('_', '-')}").lower()[:50].rstrip("-.")
        for attempt in range(3):
            name = f"{base}-{secrets.token_hex(4)}"
            body = mpijob_body(name, self.settings, int(self.workers), [str(a) for a in self.arguments],
                               {k: str(v) for k, v in self.env_vars.items()}, self.worker_resources, labels)
            try:
                hook.custom_object_client.create_namespaced_custom_object(
                    GROUP, VERSION, self.settings.namespace, PLURAL, body)
                self.log.info("created MPIJob %s/%s with %s workers", self.settings.namespace, name, self.workers)
                return name
            except ApiException as exc:
                if exc.status != 409 or attempt == 2:
                    raise
                time.sleep(1 + secrets.randbelow(3))
        raise AssertionError("unreachable")

    def _wait(self, hook) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowException

        started, printed = time.monotonic(), 0
        while True:
            job = hook.custom_object_client.get_namespaced_custom_object(
                GROUP, VERSION, self.settings.namespace, PLURAL, self.job_name)
            printed = self._copy_launcher_log(hook, printed)
            for kind in ("Succeeded", "Failed"):
                found = condition(job, kind)
                if found:
                    self._copy_launcher_log(hook, printed)
                    return {"type": kind, **found}
            if not condition(job, "Running") and time.monotonic() - started > self.startup_timeout:
                raise AirflowException(f"MPIJob {self.job_name} did not start within {self.startup_timeout:.0f} s")
            time.sleep(self.poll_interval)

    def _copy_launcher_log(self, hook, printed: int) -> int:
        """Log lines of the launcher pod not yet copied; returns how many have been."""
        from kubernetes.client.exceptions import ApiException

        core = hook.core_v1_client
        selector = f"{JOB_NAME_LABEL}={self.job_name},{JOB_ROLE_LABEL}=launcher"
        pods = core.list_namespaced_pod(self.settings.namespace, label_selector=selector).items
        if not pods:
            return printed
        try:
            # raw bytes: kubernetes 36's decoded log comes back as "b'...'" (kubernetes-client/python#2596)
            text = core.read_namespaced_pod_log(pods[0].metadata.name, self.settings.namespace, container="launcher",
                                                _preload_content=False).data.decode("utf-8", "replace")
        except ApiException:
            return printed  # not started yet
        lines = text.splitlines()
        for line in lines[printed:]:
            self.log.info("[launcher] %s", line)
        return max(printed, len(lines))

    def _delete(self, hook) -> None:
        from kubernetes.client.exceptions import ApiException

        if not self.job_name:
            return
        try:
            hook.custom_object_client.delete_namespaced_custom_object(
                GROUP, VERSION, self.settings.namespace, PLURAL, self.job_name)
            self.log.info("deleted MPIJob %s", self.job_name)
        except ApiException as exc:
            if exc.status != 404:
                raise
