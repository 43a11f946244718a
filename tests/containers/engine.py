"""Real containers for the cluster path: podman runs what the DAG would send to a kubelet.

`run_pod` turns a Pod, exactly as the provider's operator builds it, into one `podman run`:
image, command (ENTRYPOINT) and args (CMD), user, read-only root, capabilities,
no-new-privileges, memory limit, env and Secret-fed envFrom, emptyDir volumes (a fresh folder
each, writable by all as an emptyDir is). `MPIJobRun` does what the MPI Operator v2 does with
an MPIJob (its controller's wiring, read from its source): a network of the job's own, the
ssh Secret's three files at sshAuthMountPath (root-owned, mode 0644: the operator sets no
mode outside /root/.ssh), the hostfile at /etc/mpi/hostfile on the launcher, the operator's
OMPI_MCA_* environment, worker hostnames `<job>-worker-<i>.<job>.<ns>.svc`, and the launcher
started only when every worker passes its readiness probe (launcherCreationPolicy
WaitForWorkersReady). What a real cluster adds is not here: scheduling, DNS by Service, RBAC.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LOCAL_PYTHON_IMAGE = "localhost/bertdistill/python:3.11-bookworm"
CONF = ROOT / ".cache" / "containers" / "containers.conf"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def engine_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONF)}


def _niced(command: list[str], nice: int) -> list[str]:
    return ["nice", "-n", str(nice), *command] if nice else command


def podman(*args: str, check: bool = True, timeout: float = 900, nice: int = 0, **kwargs: Any
           ) -> subprocess.CompletedProcess:
    proc = subprocess.run(_niced(["podman", *args], nice), capture_output=True, text=True, env=engine_env(),
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def make(*targets: str, timeout: float = 2400, nice: int = 0, **variables: str) -> None:
    """A Makefile target, as a user runs it (`make images` is how the images are built, here too)."""
    command = ["make", "-s", *targets, *[f"{k}={v}" for k, v in variables.items()]]
    proc = subprocess.run(_niced(command, nice), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=engine_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")


def engine_problem() -> str | None:
    """Why containers cannot run here (None when they can): podman installed and answering."""
    if shutil.which("podman") is None:
        try:
            make("podman", timeout=900)
        except AssertionError as exc:
            return f"podman is not installed and `make podman` failed: {str(exc)[-300:]}"
    elif not CONF.exists():
        make("podman", timeout=120)
    proc = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                          text=True, env=engine_env(), timeout=120)
    return None if proc.returncode == 0 else f"podman does not work here: {proc.stderr.strip()[-300:]}"


def _scratch_folder(root: Path, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    folder.chmod(0o777)  # an emptyDir is writable by whichever user the container runs as
    return folder


def pod_run_args(pod: dict[str, Any], *, name: str, secrets: dict[str, dict[str, str]], volumes_root: Path,
                 network: str = "host", extra: list[str] | None = None,
                 config_maps: dict[str, dict[str, str]] | None = None) -> list[str]:
    """`podman run` arguments for the pod's (only) container, its spec honoured field by field."""
    spec = pod["spec"]
    [container] = spec["containers"]
    unknown = set(container) - {"name", "image", "command", "args", "env", "envFrom", "resources",
                                "securityContext", "volumeMounts", "readinessProbe", "livenessProbe", "workingDir",
                                "ports", "terminationMessagePolicy", "imagePullPolicy"}  # neither changes what runs
    assert not unknown, f"the container runner does not know {unknown}: teach it before trusting it"
    args = ["run", "--name", name, "--network", network, "--pull", "never"]
    sc = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
    if "runAsUser" in sc:
        args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs of its own
    caps = sc.get("capabilities") or {}
    args += [f"--cap-drop={c}" for c in caps.get("drop", [])] + [f"--cap-add={c}" for c in caps.get("add", [])]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if (sc.get("seccompProfile") or {}).get("type") not in (None, "RuntimeDefault"):
        raise AssertionError(f"seccomp profile {sc['seccompProfile']} is not emulated")
    memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if memory:
        args += ["--memory", memory.replace("Gi", "g").replace("Mi", "m")]
    env: dict[str, str] = {}
    for item in container.get("envFrom") or []:
        env.update(secrets[item["secretRef"]["name"]])
    for item in container.get("env") or []:
        if "valueFrom" in item:  # a Secret's key, as the kubelet resolves it
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = item.get("value", "")
    args += [f"--env={k}={v}" for k, v in env.items()]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "configMap" in volume:  # its keys as files, read-only
            folder = _scratch_folder(volumes_root, mount["name"])
            for key, text in (config_maps or {})[volume["configMap"]["name"]].items():
                (folder / key).write_text(text)
            args += ["-v", f"{folder}:{mount['mountPath']}:ro"]
            continue
        assert "emptyDir" in volume, f"volume {volume} is not emulated"
        args += ["-v", f"{_scratch_folder(volumes_root, mount['name'])}:{mount['mountPath']}"]
    if container.get("workingDir"):
        args += ["--workdir", container["workingDir"]]
    if container.get("command"):
        args += ["--entrypoint", json.dumps([expand(a, env) for a in container["command"]])]
    return [*args, *(extra or []), container["image"], *[expand(a, env) for a in container.get("args") or []]]


def expand(text: str, env: dict[str, str]) -> str:
    """$(NAME) in a command or args, replaced by the container's variable as the kubelet does
    ($$ escapes; an unknown name stays as written)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def run_pod(pod: dict[str, Any], *, secrets: dict[str, dict[str, str]], volumes_root: Path, timeout: float = 900,
            network: str = "host") -> subprocess.CompletedProcess:
    name = f"bd-{pod['metadata']['name'][:40]}-{os.urandom(3).hex()}"
    try:
        return podman(*pod_run_args(pod, name=name, secrets=secrets, volumes_root=volumes_root, network=network),
                      check=False, timeout=timeout)
    finally:
        podman("rm", "-f", "--ignore", name, check=False)


class MPIJobRun:
    """One MPIJob run as the MPI Operator v2 runs it, on a podman network of its own."""

    def __init__(self, job: dict[str, Any], *, secrets: dict[str, dict[str, str]], work: Path,
                 shared: dict[str, str] | None = None):
        self.job, self.secrets, self.work = job, secrets, work
        self.shared = shared or {}  # host folder -> path in every worker: a ReadWriteMany volume
        self.name = job["metadata"]["name"]
        self.namespace = job["metadata"]["namespace"]
        self.network = f"bd-{self.name}"
        self.containers: list[str] = []
        self.host_keys: list[str] = []  # each worker's sshd host key (public half), read once it is Ready

    def hostname(self, index: int) -> str:
        return f"{self.name}-worker-{index}.{self.name}.{self.namespace}.svc"

    def _ssh_secret(self) -> Path:
        """The `<job>-ssh` Secret's files as the operator mounts them (ECDSA P-521 key, PEM)."""
        folder = self.work / "ssh-auth"
        folder.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-m", "PEM", "-N", "", "-f",
                        str(folder / "id_rsa")], check=True)
        shutil.copyfile(folder / "id_rsa.pub", folder / "authorized_keys")
        for f in folder.iterdir():
            os.chown(f, 0, 0)
            f.chmod(0o644)
        return folder

    def _config(self, workers: int, slots: int) -> Path:
        folder = self.work / "mpi-job-config"
        folder.mkdir()
        (folder / "hostfile").write_text("".join(f"{self.hostname(i)} slots={slots}\n" for i in range(workers)))
        (folder / "discover_hosts.sh").write_text("#!/bin/sh\n" + "".join(f"echo {self.hostname(i)}\n"
                                                                          for i in range(workers)))
        (folder / "hostfile").chmod(0o444)
        (folder / "discover_hosts.sh").chmod(0o555)
        return folder

    def _pod(self, role: str, index: int | None = None) -> dict[str, Any]:
        replica = self.job["spec"]["mpiReplicaSpecs"][role]
        name = f"{self.name}-{role.lower()}" + (f"-{index}" if index is not None else "")
        return {"metadata": {"name": name}, "spec": replica["template"]["spec"]}

    def _ready(self, container: str, probe: dict[str, Any], timeout: float = 120) -> None:
        port = probe["tcpSocket"]["port"]
        check = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if podman("exec", container, "python", "-c", check, check=False).returncode == 0:
                return
            if podman("inspect", "-f", "{{.State.Running}}", container, check=False).stdout.strip() != "true":
                raise AssertionError(f"worker {container} exited:\n{podman('logs', container, check=False).stderr}")
            time.sleep(1)
        raise AssertionError(f"worker {container} never became Ready (port {port})")

    def run(self, timeout: float = 900) -> subprocess.CompletedProcess:
        spec = self.job["spec"]
        assert spec["mpiImplementation"] == "OpenMPI" and spec["launcherCreationPolicy"] == "WaitForWorkersReady"
        workers, slots = spec["mpiReplicaSpecs"]["Worker"]["replicas"], spec.get("slotsPerWorker", 1)
        ssh, config = self._ssh_secret(), self._config(workers, slots)
        ssh_mount = ["-v", f"{ssh}:{spec['sshAuthMountPath']}:ro"]
        podman("network", "create", self.network)
        try:
            addresses = []
            for i in range(workers):
                pod = self._pod("Worker", i)
                extra = [*ssh_mount, "--hostname", f"{self.name}-worker-{i}", "--env", "K_MPI_JOB_ROLE=worker",
                         "--detach", *[f"-v={host}:{path}" for host, path in self.shared.items()]]
                args = pod_run_args(pod, name=pod["metadata"]["name"], secrets=self.secrets,
                                    volumes_root=self.work, network=self.network, extra=extra)
                podman(*args)
                self.containers.append(pod["metadata"]["name"])
                networks = json.loads(podman("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                             pod["metadata"]["name"]).stdout)
                addresses.append(networks[self.network]["IPAddress"])
            worker_spec = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
            for container in self.containers:
                self._ready(container, worker_spec["readinessProbe"])
                self.host_keys.append(podman("exec", container, "sh", "-c",
                                             "cat ${BERTDISTILL_SCRATCH:-$HOME}/.sshd/*.pub").stdout.split()[1])
            launcher = self._pod("Launcher")
            env = {"K_MPI_JOB_ROLE": "launcher", "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
                   "OMPI_MCA_orte_default_hostfile": "/etc/mpi/hostfile",
                   "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10", "OMPI_MCA_orte_set_default_slots": str(slots),
                   "NVIDIA_VISIBLE_DEVICES": "", "NVIDIA_DRIVER_CAPABILITIES": ""}
            extra = [*ssh_mount, "-v", f"{config}:/etc/mpi:ro", "--hostname", f"{self.name}-launcher",
                     *[f"--env={k}={v}" for k, v in env.items()],
                     *[f"--add-host={self.hostname(i)}:{ip}" for i, ip in enumerate(addresses)]]
            args = pod_run_args(launcher, name=launcher["metadata"]["name"], secrets=self.secrets,
                                volumes_root=self.work, network=self.network, extra=extra)
            self.containers.append(launcher["metadata"]["name"])
            return podman(*args, check=False, timeout=timeout)
        finally:
            for container in self.containers:
                podman("rm", "-f", "--ignore", container, check=False)
            podman("network", "rm", "-f", self.network, check=False)
