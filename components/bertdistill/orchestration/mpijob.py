"""distill on Kubernetes: a Kubeflow MPIJob (v2beta1) running `mpirun ... bertdistill distill`.

The job itself is mpijob_spec.py's `mpijob_body`. Here, after the cncf provider's hook / launcher /
operator / trigger split:
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

from bertdistill.orchestration.mpijob_spec import (
    GROUP,
    JOB_NAME_LABEL,
    JOB_ROLE_LABEL,
    PLURAL,
    VERSION,
    condition,
    isolation_policy,
    label_value,
    mpijob_body,
    outcome,
    ti_labels,
)
from bertdistill.orchestration.settings import Settings


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
