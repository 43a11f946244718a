"""A stand-in cluster: the kmock Kubernetes API emulator plus a tiny kubelet and MPI operator.

kmock stores objects and answers the API; it does not run anything. The `Kubelet` thread
plays the two controllers the DAG depends on: for each new Pod it runs the container's
command as a local process (the image is ignored; /scratch maps to a temp folder), serves
its output as the pod log and sets the phase from the exit code; for each new MPIJob it
creates the launcher Pod the MPI operator would, runs the launcher's command with mpirun
replaced by one local process, and sets the Succeeded or Failed condition. Everything the
DAG sends stays recorded in the emulator for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

PODS, MPIJOBS = "v1/pods", "kubeflow.org/v2beta1/mpijobs"
NETWORK_POLICIES = "networking.k8s.io/v1/networkpolicies"


class Cluster:
    def __init__(self, scratch: Path):
        import kmock

        self.kmock = kmock
        self.scratch = scratch
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()

        async def start():
            emu = await self.stack.enter_async_context(kmock.KubernetesEmulator())
            await self.stack.enter_async_context(kmock.Server(emu))
            return emu

        self.emu = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=20)
        self.url = str(self.emu.url).rstrip("/")
        self.emu.resources[PODS] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        self.emu.resources[MPIJOBS] = kmock.ResourceInfo(kind="MPIJob", namespaced=True)
        self.emu.resources[NETWORK_POLICIES] = kmock.ResourceInfo(kind="NetworkPolicy", namespaced=True)
        self.emu[kmock.action.LIST, kmock.resource(PODS)] << self._list_pods  # kmock ignores selectors
        self.emu[kmock.action.FETCH, kmock.resource(PODS)] << self._fetch_pod  # and has no status or logs
        self.logs: dict[str, list[tuple[datetime, str]]] = {}
        self.handled: set[tuple[str, str, str]] = set()
        self.stopping = threading.Event()
        self.kubelet = threading.Thread(target=self._run, daemon=True)
        self.kubelet.start()

    # -- plumbing ----------------------------------------------------------------------------
    def on_loop(self, fn, *args):
        async def call():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=20)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{self.url}"}}}}]
users: [{{name: nobody, user: {{}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: nobody, namespace: bertdistill}}}}]
current-context: kmock
""")
        return path

    def close(self) -> None:
        self.stopping.set()
        self.kubelet.join(timeout=10)
        asyncio.run_coroutine_threadsafe(self.stack.aclose(), self.loop).result(timeout=20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def _list_pods(self, request):
        want = dict(kv.split("=", 1) for kv in request.params.get("labelSelector", "").split(",") if "=" in kv)
        items = [o.raw for (res, ns, _), o in list(self.emu.objects.items())
                 if res == PODS and not o.deleted and request.namespace in (None, ns)
                 and want.items() <= (o.get("metadata", {}).get("labels") or {}).items()]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def _fetch_pod(self, request):
        """A pod as the API server returns it (Pending until the kubelet says otherwise), or its log."""
        key = (PODS, request.namespace, request.name)
        found = next((o for k, o in list(self.emu.objects.items()) if k == key and not o.deleted), None)
        if request.subresource == "log":
            return self._log(request.name, request.params)
        if found is None:  # a real 404 (a bare 404 would be a 200 whose body the client reads as a Pod)
            raise self.kmock.KubernetesObjectNotFoundError(f"pods {request.name!r} not found")
        return {**found.raw, "status": found.raw.get("status") or {"phase": "Pending"}}

    def objects(self, resource: str) -> list[tuple[str, str, dict]]:
        return [(ns, name, o.raw) for (res, ns, name), o in list(self.emu.objects.items())
                if res == resource and not o.deleted]

    def requests(self, *criteria):
        return list(self.emu[criteria])

    # -- the controllers ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping.is_set():
            for ns, name, pod in self.objects(PODS):
                if (PODS, ns, name) not in self.handled and not (pod.get("metadata", {}).get("labels") or {}).get(
                        "training.kubeflow.org/job-role"):
                    self.handled.add((PODS, ns, name))
                    self._run_pod(ns, name, pod)
            for ns, name, job in self.objects(MPIJOBS):
                if (MPIJOBS, ns, name) not in self.handled:
                    self.handled.add((MPIJOBS, ns, name))
                    self._run_mpijob(ns, name, job)
            time.sleep(0.2)

    def _execute(self, container: dict) -> tuple[int, str]:
        env = {**os.environ, **{e["name"]: e.get("value", "") for e in container.get("env") or []}}
        for key in ("BERTDISTILL_SCRATCH", "HOME"):
            if env.get(key) == "/scratch":
                env[key] = str(self.scratch)
        command = [*(container.get("command") or []), *(container.get("args") or [])]
        if command and command[0] == "bertdistill":
            command = [sys.executable, "-m", "bertdistill.cli", *command[1:]]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        return proc.returncode, proc.stdout + proc.stderr

    def _serve_log(self, name: str, text: str) -> None:
        """Each line stamped with the time it was served, as the kubelet stamps the lines it keeps."""
        stamp = datetime.now(UTC)
        self.logs[name] = [(stamp, line) for line in text.splitlines()]

    def _log(self, name: str, params) -> bytes:
        """A pod's log as the API server answers: `timestamps` prefixes RFC 3339 times, `sinceSeconds` cuts."""
        lines = self.logs.get(name, [])
        if params.get("sinceSeconds"):
            oldest = datetime.now(UTC) - timedelta(seconds=int(params["sinceSeconds"]))
            lines = [(t, line) for t, line in lines if t >= oldest]
        if params.get("timestamps") in ("true", "True", "1"):
            return "".join(f"{t.strftime('%Y-%m-%dT%H:%M:%S.%f')}000Z {line}\n" for t, line in lines).encode()
        return "".join(f"{line}\n" for _, line in lines).encode()

    def _run_pod(self, ns: str, name: str, pod: dict) -> None:
        container = pod["spec"]["containers"][0]
        code, output = self._execute(container)
        self._serve_log(name, output)
        phase = "Succeeded" if code == 0 else "Failed"
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        status = {"phase": phase, "containerStatuses": [{
            "name": container["name"], "ready": False, "restartCount": 0, "image": container.get("image", ""),
            "imageID": "", "state": {"terminated": terminated}}]}
        self.on_loop(lambda: self.emu.objects[PODS, ns, name].patch({"status": status}))

    def _run_mpijob(self, ns: str, name: str, job: dict) -> None:
        template = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]
        container = dict(template["spec"]["containers"][0])
        launcher = f"{name}-launcher"
        labels = {**(template.get("metadata", {}).get("labels") or {}),
                  "training.kubeflow.org/job-name": name, "training.kubeflow.org/job-role": "launcher"}
        self.on_loop(self.emu.objects.__setitem__, (PODS, ns, launcher), {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": launcher, "namespace": ns, "labels": labels},
            "spec": template["spec"]})
        self.on_loop(lambda: self.emu.objects[MPIJOBS, ns, name].patch(
            {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}}))
        command = container["command"]
        container["command"] = ["bertdistill", *command[command.index("bertdistill") + 1:]]  # one rank, locally
        code, output = self._execute(container)
        self._serve_log(launcher, output)
        outcome = {"type": "Succeeded", "status": "True", "reason": "MPIJobSucceeded"} if code == 0 else {
            "type": "Failed", "status": "True", "reason": "MPIJobFailed", "message": f"launcher exited {code}"}
        self.on_loop(lambda: self.emu.objects[MPIJOBS, ns, name].patch({"status": {"conditions": [
            {"type": "Created", "status": "True"}, {"type": "Running", "status": "False"}, outcome]}}))
