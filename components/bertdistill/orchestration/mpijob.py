"""distill on Kubernetes: a Kubeflow MPIJob (v2beta1) running `mpirun ... bertdistill distill`.

Three parts, after the cncf provider's hook / launcher / operator / trigger split:
- `mpijob_body`: the job, wired as the MPI Operator v2 expects: workers start the trainer
  image's sshd (the operator would otherwise start a root sshd on port 22) and are Ready
  once it listens; the launcher is created only when every worker is Ready (their DNS names
  resolve only then), and the job is bounded by a deadline and removed after a TTL even if
  nobody follows it any more.
- `MPIJobLauncher`: every API call, each retried on transient errors like the provider's
  (`generic_api_retry`): adopt a job an earlier try left, create, read conditions, follow the
  launcher's log incrementally (by timestamp, not by re-reading it whole), delete.
- `MPIJobOperator`: waits in the worker, or with `deferrable=True` hands the waiting to
  `MPIJobTrigger` and frees the worker slot. Success is read from the job's conditions,
  never from a pod being gone. The job is deleted on success, on failure and on kill, but
  not when following it broke (an API outage): a retry adopts it, and the deadline bounds it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import generic_api_retry
from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from bertdistill.orchestration.runners import (
    SCRATCH,
    container_resources,
    scratch_volume,
    secret_env,
    security_context,
)
from bertdistill.orchestration.settings import Settings

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v2beta1", "mpijobs", "MPIJob"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
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


JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the MPI Operator puts it on the job's launcher and workers


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


class MPIJobLauncher:
    """The MPIJob's lifecycle through the Kubernetes API, each call retried on transient errors."""

    def __init__(self, namespace: str, kubernetes_conn_id: str, log: Any):
        self.namespace, self.kubernetes_conn_id, self.log = namespace, kubernetes_conn_id, log
        self.log_since: datetime | None = None  # timestamp of the last launcher log line copied
        self._hook = None

    def hook(self):
        """One hook (and its API clients) for the whole wait, not one per call of every poll."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        if self._hook is None:
            self._hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
        return self._hook

    @generic_api_retry
    def find(self, labels: dict[str, str]) -> str | None:
        """The newest unfailed job with these labels (any try of this task instance), left by an earlier try."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items() if not k.endswith("try_number"))
        found = self.hook().custom_object_client.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, label_selector=selector).get("items", [])
        live = sorted((j for j in found if not condition(j, "Failed")),
                      key=lambda j: j["metadata"].get("creationTimestamp", ""))
        if len(live) > 1:
            self.log.warning("%d MPIJobs match this task instance; adopting the newest", len(live))
        return live[-1]["metadata"]["name"] if live else None

    def create(self, base: str, body_for: Any) -> str:
        """Create a job named base-<random>; a name clash (409) takes another suffix, three times at most."""
        for attempt in range(3):
            name = f"{base}-{secrets.token_hex(4)}"
            try:
                created = self._create(body_for(name))
                self._isolate(name, (created or {}).get("metadata", {}).get("uid"))
                return name
            except _NameTaken:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @generic_api_retry
    def _isolate(self, name: str, uid: str | None) -> None:
        from kubernetes.client import NetworkingV1Api
        from kubernetes.client.exceptions import ApiException

        try:
            NetworkingV1Api(self.hook().api_client).create_namespaced_network_policy(
                self.namespace, isolation_policy(name, self.namespace, uid))
        except ApiException as exc:
            if exc.status != 409:  # made by an earlier attempt of this call
                raise

    @generic_api_retry
    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.hook().custom_object_client.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status == 409:  # a clash is answered with another name, not retried as is
                raise _NameTaken(exc) from exc
            raise

    @generic_api_retry
    def get(self, name: str) -> dict[str, Any]:
        return self.hook().custom_object_client.get_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                                               PLURAL, name)

    @generic_api_retry
    def copy_launcher_log(self, name: str) -> None:
        """Copy the launcher's log lines newer than the last one copied into the task log."""
        from kubernetes.client.exceptions import ApiException

        core = self.hook().core_v1_client
        pods = core.list_namespaced_pod(self.namespace,
                                        label_selector=f"{JOB_NAME_LABEL}={name},{JOB_ROLE_LABEL}=launcher").items
        if not pods:
            return
        pod = sorted(pods, key=lambda p: p.metadata.creation_timestamp or datetime.min.replace(tzinfo=UTC))[-1]
        since = None
        if self.log_since is not None:
            since = max(1, int((datetime.now(UTC) - self.log_since).total_seconds()) + 1)
        try:
            # raw bytes: kubernetes 36's decoded log comes back as "b'...'" (kubernetes-client/python#2596)
            text = core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container="launcher",
                                                timestamps=True, since_seconds=since,
                                                _preload_content=False).data.decode("utf-8", "replace")
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                return
            raise
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            when = _timestamp(stamp)
            if when is None:
                when, message = self.log_since or datetime.min.replace(tzinfo=UTC), line
            elif self.log_since is not None and when <= self.log_since:
                continue  # since_seconds has whole-second granularity: skip what was copied already
            self.log.info("[launcher] %s", message)
            self.log_since = when

    @generic_api_retry
    def delete(self, name: str) -> None:
        from kubernetes.client import NetworkingV1Api
        from kubernetes.client.exceptions import ApiException

        try:
            self.hook().custom_object_client.delete_namespaced_custom_object(GROUP, VERSION, self.namespace,
                                                                             PLURAL, name)
            self.log.info("deleted MPIJob %s", name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:  # its owner reference removes it too, where the cluster's garbage collector runs
            NetworkingV1Api(self.hook().api_client).delete_namespaced_network_policy(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def poll(self, name: str, started: float, startup_timeout: float) -> dict[str, Any] | None:
        """One look at the job: its outcome when finished (or not started in time), else None."""
        job = self.get(name)
        self.copy_launcher_log(name)
        found = outcome(job)
        if found:
            self.copy_launcher_log(name)
        elif not condition(job, "Running") and time.time() - started > startup_timeout:
            found = {"type": "Failed", "reason": "StartupTimeout",
                     "message": f"not running within {startup_timeout:.0f} s (workers not Ready? see its events)"}
        return found


class _NameTaken(Exception):
    """A 409 from create: raised past generic_api_retry (which retries 409s) to pick another name."""

    def __init__(self, exc: Exception):
        super().__init__(str(exc))


def _timestamp(text: str) -> datetime | None:
    """An RFC 3339 timestamp as the API server prefixes log lines with (nanoseconds cut to micro)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        return None
    fraction = (match[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(f"{match[1]}.{fraction}{zone}")


class MPIJobTrigger(BaseTrigger):
    """Follows an MPIJob from the triggerer (its launcher log included) until it has an outcome."""

    def __init__(self, name: str, namespace: str, kubernetes_conn_id: str, poll_interval: float,
                 startup_timeout: float, started: float):
        super().__init__()
        self.name, self.namespace, self.kubernetes_conn_id = name, namespace, kubernetes_conn_id
        self.poll_interval, self.startup_timeout, self.started = poll_interval, startup_timeout, started

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.MPIJobTrigger", {
            "name": self.name, "namespace": self.namespace, "kubernetes_conn_id": self.kubernetes_conn_id,
            "poll_interval": self.poll_interval, "startup_timeout": self.startup_timeout, "started": self.started})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        launcher = MPIJobLauncher(self.namespace, self.kubernetes_conn_id, self.log)
        while True:
            try:  # the synchronous client, off the triggerer's event loop
                found = await asyncio.to_thread(launcher.poll, self.name, self.started, self.startup_timeout)
            except Exception as exc:  # retries spent: the operator decides, and keeps the job
                yield TriggerEvent({"type": "Error", "name": self.name, "message": str(exc)})
                return
            if found:
                yield TriggerEvent({**found, "name": self.name})
                return
            await asyncio.sleep(self.poll_interval)


class MPIJobOperator(BaseOperator):
    """Runs `bertdistill <arguments>` under mpirun in an MPIJob and waits for its outcome."""

    template_fields: Sequence[str] = ("arguments", "workers", "env_vars")
    ui_color = "#e4ecf7"

    def __init__(self, *, arguments: list[str], workers: int | str, settings: Settings, env_vars: dict[str, str],
                 worker_resources: dict[str, str], kubernetes_conn_id: str = "kubernetes_default",
                 poll_interval: float = 10.0, startup_timeout: float = 1800.0, deferrable: bool = False,
                 **kwargs: Any):
        kwargs.setdefault("execution_timeout", timedelta(days=3))
        super().__init__(**kwargs)
        self.arguments, self.workers, self.env_vars = arguments, workers, env_vars
        self.settings, self.worker_resources = settings, worker_resources
        self.kubernetes_conn_id, self.poll_interval, self.startup_timeout = (kubernetes_conn_id, poll_interval,
                                                                             startup_timeout)
        self.deferrable = deferrable
        self.job_name: str | None = None

    def launcher(self) -> MPIJobLauncher:
        return MPIJobLauncher(self.settings.namespace, self.kubernetes_conn_id, self.log)

    def execute(self, context: Any) -> None:
        launcher = self.launcher()
        labels = {"app.kubernetes.io/name": "bertdistill", "app.kubernetes.io/component": "distill",
                  **ti_labels(context)}
        self.job_name = launcher.find(labels)
        if self.job_name:
            self.log.info("adopting MPIJob %s from an earlier try", self.job_name)
        else:
            base = label_value(f"bertdistill-{self.task_id.replace('_', '-')}").lower()[:50].rstrip("-.")
            self.job_name = launcher.create(base, lambda name: mpijob_body(
                name, self.settings, int(self.workers), [str(a) for a in self.arguments],
                {k: str(v) for k, v in self.env_vars.items()}, self.worker_resources, labels,
                self.execution_timeout or timedelta(days=3)))
            self.log.info("created MPIJob %s/%s with %s workers", self.settings.namespace, self.job_name,
                          self.workers)
        started = time.time()
        if self.deferrable:
            self.defer(trigger=MPIJobTrigger(self.job_name, self.settings.namespace, self.kubernetes_conn_id,
                                             self.poll_interval, self.startup_timeout, started),
                       method_name="execute_complete")
        while not (found := launcher.poll(self.job_name, started, self.startup_timeout)):
            time.sleep(self.poll_interval)
        self._finish(launcher, {**found, "name": self.job_name})

    def execute_complete(self, context: Any, event: dict[str, Any]) -> None:
        self.job_name = event["name"]
        self._finish(self.launcher(), event)

    def _finish(self, launcher: MPIJobLauncher, event: dict[str, Any]) -> None:
        from airflow.sdk.exceptions import AirflowException

        if event["type"] == "Error":  # following broke, not the job: keep it for the retry to adopt
            raise AirflowException(f"lost track of MPIJob {event['name']} ({event['message']}); "
                                   "it is kept, and a retry adopts it")
        launcher.delete(event["name"])
        if event["type"] == "Failed":
            raise AirflowException(f"MPIJob {event['name']} failed: {event.get('reason', '')} "
                                   f"{event.get('message', '')}".strip())
        self.log.info("MPIJob %s succeeded", event["name"])

    def on_kill(self) -> None:
        if self.job_name:
            self.launcher().delete(self.job_name)
