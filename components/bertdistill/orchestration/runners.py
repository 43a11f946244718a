"""One way to declare a step in the DAG, whatever runs it: a local process, a pod, an MPIJob.

The DAG asks for `single`, `mapped` or `distill` (mapped, MPIJobs in Kubernetes) tasks; the mode
in Settings decides the operator. All take the step's arguments (after `bertdistill`) from an
upstream task's output, and all give the step the same environment: tracking settings, the
MLflow parent run of this DAG run (prepare's output, passed in as an XComArg), and in
Kubernetes the S3 credentials from a Secret (never from DAG code). In both modes a step that
refuses its input (exit 2) fails its task at once; any other failure is left to the retries.
"""

from __future__ import annotations

from typing import Any

from bertdistill.orchestration.settings import Settings

SCRATCH = "/scratch"

# requests (= limits for memory and scratch) per step in the kubernetes mode; label-teacher runs the
# teacher on a GPU. Scratch (an emptyDir of that size, and the pod's ephemeral-storage request) is
# what the step holds locally at most, whatever the dump's size: one dump file (fetch-dump,
# extract: enwiki's are under 3 GB), one 8 MB upload part per open shard (build-corpus, at most
# 1,024 shards), a staged teacher and the model being exported; make-examples' whole-shard
# shuffle holds one shard's examples, sized by BERTDISTILL_SHARD_TARGET_MB (scratch_size).
RESOURCES: dict[str, dict[str, str]] = {
    "fetch_dump": {"cpu": "1", "memory": "1Gi", "scratch": "8Gi"},
    "extract": {"cpu": "4", "memory": "4Gi", "scratch": "8Gi"},
    "build_corpus": {"cpu": "2", "memory": "4Gi", "scratch": "10Gi"},
    "make_examples": {"cpu": "4", "memory": "2Gi"},
    "fetch_teacher": {"cpu": "1", "memory": "4Gi", "scratch": "4Gi"},
    "adapt_teacher": {"cpu": "4", "memory": "16Gi", "gpu": "1", "scratch": "4Gi"},
    "label_teacher": {"cpu": "4", "memory": "16Gi", "gpu": "1", "scratch": "4Gi"},
    "distill": {"cpu": "4", "memory": "16Gi", "gpu": "1", "scratch": "4Gi"},
    "evaluate": {"cpu": "4", "memory": "8Gi", "scratch": "4Gi"},
    "publish": {"cpu": "2", "memory": "4Gi", "scratch": "4Gi"},
}


def scratch_size(task_id: str, settings: Settings) -> str:
    """A step's scratch: its fixed figure, or for make-examples one target-sized shard plus 1 GiB."""
    if task_id == "make_examples":
        return f"{-(-int(settings.shard_target_mb) // 1024) + 1}Gi"
    return RESOURCES[task_id]["scratch"]


def scratch_volume(size: str | None):
    """The scratch emptyDir, limited to what the pod requested: a step that outgrows it is evicted,
    not left to fill the node's disk (None: no limit, for callers that size nothing)."""
    from kubernetes.client import models as k8s

    return k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=size))


class StepOperators:
    """The step tasks of one DAG. `parent_run` and `ranks` are task outputs (XComArgs) or plain
    values: Airflow resolves them when a task runs and makes each step task wait for them."""

    def __init__(self, settings: Settings, parent_run: Any = "", ranks: Any = 1):
        self.settings, self.parent_run, self.ranks = settings, parent_run, ranks

    def env(self) -> dict[str, Any]:
        return {**self.settings.step_env(), "BERTDISTILL_PARENT_RUN_ID": self.parent_run}

    def single(self, task_id: str, arguments: Any):
        cls, kwargs = self._operator(task_id)
        return cls(task_id=task_id, arguments=arguments, **kwargs, **self._pool(task_id))

    def mapped(self, task_id: str, arguments: Any):
        cls, kwargs = self._operator(task_id)
        return cls.partial(task_id=task_id, **kwargs, **self._pool(task_id)).expand(arguments=arguments)

    def _pool(self, task_id: str) -> dict[str, str]:
        """The GPU pool for steps that take a GPU (BERTDISTILL_GPU_POOL): Airflow then starts at most
        as many of them as the pool has slots, so a 1,000-shard label-teacher does not put 1,000 pods
        in the queue for a cluster's 8 GPUs. An Airflow pool must exist before its tasks can run:
        `airflow pools set <name> <GPUs> "GPU steps"`."""
        if self.settings.mode == "kubernetes" and self.settings.gpu_pool and "gpu" in RESOURCES[task_id]:
            return {"pool": self.settings.gpu_pool}
        return {}

    def distill(self, task_id: str, arguments: Any):
        """One Horovod training per argument list (the student and its no-teacher control)."""
        if self.settings.mode == "kubernetes":
            from bertdistill.orchestration.mpijob import MPIJobOperator

            # deferrable: the triggerer follows the training, which can take days, not a worker slot
            return MPIJobOperator.partial(task_id=task_id, workers=self.ranks, settings=self.settings,
                                          env_vars=self.env(), worker_resources=RESOURCES["distill"],
                                          deferrable=True, **self._pool(task_id)).expand(arguments=arguments)
        from bertdistill.orchestration.local import LocalStepOperator

        return LocalStepOperator.partial(task_id=task_id, env_vars=self.env(),
                                         ranks=self.ranks).expand(arguments=arguments)

    def _operator(self, task_id: str) -> tuple[type, dict[str, Any]]:
        if self.settings.mode == "kubernetes":
            from bertdistill.orchestration.pods import StepPodOperator

            return StepPodOperator, pod_kwargs(self.settings, task_id, self.env())
        from bertdistill.orchestration.local import LocalStepOperator

        return LocalStepOperator, {"env_vars": self.env()}


def container_resources(wanted: dict[str, str], gpu_resource: str):
    from kubernetes.client import models as k8s

    requests = {"cpu": wanted["cpu"], "memory": wanted["memory"]}
    limits = {"memory": wanted["memory"]}
    if "scratch" in wanted:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = wanted["scratch"]
    if "gpu" in wanted:
        requests[gpu_resource] = limits[gpu_resource] = wanted["gpu"]
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def secret_env(settings: Settings) -> list:
    """envFrom for every step container: the Secrets it loads whole (S3 keys; the MLflow user)."""
    from kubernetes.client import models as k8s

    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=n)) for n in settings.secrets()]


def security_context(read_only_root: bool = True):
    """Steps run as an unprivileged user with nothing to escalate to (MPI workers' sshd writes its home)."""
    from kubernetes.client import models as k8s

    return k8s.V1SecurityContext(run_as_non_root=True, run_as_user=10001, allow_privilege_escalation=False,
                                 read_only_root_filesystem=read_only_root,
                                 capabilities=k8s.V1Capabilities(drop=["ALL"]),
                                 seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def pod_kwargs(settings: Settings, task_id: str, env: dict[str, str]) -> dict[str, Any]:
    """KubernetesPodOperator arguments for one step: image, resources, Secret-fed S3 credentials, scratch.

    A step that asks for a GPU gets the GPU build of the pipeline image; the others the CPU build.
    """
    from kubernetes.client import models as k8s

    wanted = RESOURCES[task_id] | {"scratch": scratch_size(task_id, settings)}
    return {
        "name": f"bertdistill-{task_id.replace('_', '-')}",
        "namespace": settings.namespace,
        "service_account_name": settings.service_account,
        "image": settings.pipeline_gpu_image if "gpu" in wanted else settings.pipeline_image,
        "cmds": ["bertdistill"],
        "env_vars": {**env, "BERTDISTILL_SCRATCH": SCRATCH, "HOME": SCRATCH, "TMPDIR": SCRATCH},
        "env_from": secret_env(settings),
        "container_resources": container_resources(wanted, settings.gpu_resource),
        "container_security_context": security_context(),
        "volumes": [scratch_volume(wanted["scratch"])],
        "volume_mounts": [k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)],
        "labels": {"app.kubernetes.io/name": "bertdistill", "app.kubernetes.io/component": task_id},
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "durable": True,  # a restarted worker follows the pod it started instead of starting another
        # Unscheduled (waiting for a node with a free GPU, or with the scratch it asks for) is not a
        # failure: a GPU step may wait 6 hours, another 1, and the provider then says "took too long
        # to be scheduled". Once placed, 10 minutes to pull the image and start.
        "schedule_timeout_seconds": (6 if "gpu" in wanted else 1) * 3600,
        "startup_timeout_seconds": 600,
    }
