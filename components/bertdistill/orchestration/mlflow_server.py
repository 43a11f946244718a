"""The tracking server with MLflow's basic-auth app, and the pipeline's identity in it.

    python -m bertdistill.orchestration.mlflow_server -- --host 0.0.0.0 --port 5000 ...

runs `mlflow server --app-name basic-auth ...`, waits until it answers /health, makes sure
the pipeline's user exists with the password from its Secret (created, or its password set
again, so a rotated Secret takes effect at the next start), then waits on the server,
passing SIGTERM on. Why: the registry's `champion` alias is what serving loads, so only the
pipeline may move it. With basic-auth every request needs a user; the pipeline owns the
experiment and the registered models it creates (MANAGE), and everyone else gets the
server's default permission on them (READ in the chart): people browse, nobody else writes.

The admin comes from MLflow's own MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD,
the pipeline from BERTDISTILL_PIPELINE_USERNAME / BERTDISTILL_PIPELINE_PASSWORD: in the
chart, keys of Secrets the operator creates, never values.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def api(base: str, path: str, body: dict, user: str, password: str, method: str = "POST") -> tuple[int, dict]:
    """One call to the server's REST API as `user`: (HTTP status, JSON answer)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"message": text.decode(errors="replace")}


def ensure_user(base: str, admin: tuple[str, str], user: str, password: str) -> str:
    """Create `user`, or set its password when it exists: 'created' or 'updated'."""
    status, answer = api(base, "/api/2.0/mlflow/users/create", {"username": user, "password": password}, *admin)
    if status == 200:
        return "created"
    if answer.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise RuntimeError(f"creating MLflow user {user!r} failed ({status}): {answer.get('message', answer)}")
    status, answer = api(base, "/api/2.0/mlflow/users/update-password", {"username": user, "password": password},
                         *admin, method="PATCH")
    if status != 200:
        raise RuntimeError(f"setting the password of MLflow user {user!r} failed ({status}): "
                           f"{answer.get('message', answer)}")
    return "updated"


def wait_healthy(url: str, timeout_s: float = 300, server: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200; RuntimeError if `server` (when given) exits first, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(1)


def _local_base(args: list[str]) -> str:
    """Where this container reaches its own server: loopback, on the --port it was given."""
    port = "5000"
    for i, arg in enumerate(args):
        if arg.startswith("--port="):
            port = arg.split("=", 1)[1]
        elif arg in ("--port", "-p") and i + 1 < len(args):
            port = args[i + 1]
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    needed = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "BERTDISTILL_PIPELINE_USERNAME",
              "BERTDISTILL_PIPELINE_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
    missing = [name for name in needed if not os.environ.get(name)]
    if missing:
        print(f"error: mlflow_server: {', '.join(missing)} not set: give the admin's and the pipeline's "
              "credentials and a Flask secret key from Secrets (the chart's mlflow.auth values)", file=sys.stderr)
        return 2
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", *args])
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    base = _local_base(args)
    try:
        wait_healthy(f"{base}/health", server=server)
        admin = (os.environ["MLFLOW_AUTH_ADMIN_USERNAME"], os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
        user = os.environ["BERTDISTILL_PIPELINE_USERNAME"]
        done = ensure_user(base, admin, user, os.environ["BERTDISTILL_PIPELINE_PASSWORD"])
        print(f"mlflow_server: pipeline user {user!r} {done}", file=sys.stderr, flush=True)
    except RuntimeError as exc:
        print(f"error: mlflow_server: {exc}", file=sys.stderr)
        server.terminate()
        server.wait()
        return 1
    return server.wait()


if __name__ == "__main__":
    sys.exit(main())
