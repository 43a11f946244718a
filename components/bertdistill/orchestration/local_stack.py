"""`make up` / `make down`: Airflow and an MLflow server on this machine, on 127.0.0.1 only.

`airflow standalone` would be one command, but it binds its log servers on every interface
and starts ~30 workers; here each Airflow component is started on its own (api-server,
scheduler with LocalExecutor, dag-processor, triggerer; log servers off, since every
component shares this machine's log folder), plus `mlflow server`. Processes run in their
own sessions with pid files under the Airflow home, so `down` stops exactly them. The login
is a generated password kept in the Airflow home.

    python -m bertdistill.orchestration.local_stack up|down
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from bertdistill.orchestration.mlflow_server import wait_healthy

HOST = "127.0.0.1"
USER = "admin"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _secrets(home: Path) -> dict[str, str]:
    """Secrets every component must share (the JWT signing key, the login), made once per home."""
    path = home / "stack-secrets.json"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"jwt_secret": secrets.token_urlsafe(32), "secret_key": secrets.token_urlsafe(32),
                                    "password": secrets.token_urlsafe(12)}))
        path.chmod(0o600)
    return json.loads(path.read_text())


def environment(home: Path, data: Path, airflow_port: int, mlflow_port: int, extra: dict[str, str] | None = None
                ) -> dict[str, str]:
    s = _secrets(home)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({USER: s["password"]}))
    passwords.chmod(0o600)
    base = f"http://{HOST}:{airflow_port}"
    repo = Path(__file__).resolve().parents[3]
    return {
        # unpausing the monthly DAG on a laptop starts a run of minutes (make demo's sizes), not hours
        "BERTDISTILL_MONTHLY_PARAMS": json.dumps({"size": "demo"}),
        **os.environ,
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4", "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__API__BASE_URL": base, "AIRFLOW__API__HOST": HOST, "AIRFLOW__API__PORT": str(airflow_port),
        "AIRFLOW__API__WORKERS": "1", "AIRFLOW__API__SECRET_KEY": s["secret_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "BERTDISTILL_STORE": str(data), "BERTDISTILL_MLFLOW_URI": f"http://{HOST}:{mlflow_port}",
        "BERTDISTILL_AIRFLOW_URL": base,
        **(extra or {}),
    }


def commands(data: Path, airflow_port: int, mlflow_port: int) -> dict[str, list[str]]:
    mlflow_root = data / "mlflow"
    return {
        "mlflow": [_bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{mlflow_root / 'mlflow.db'}",
                   "--artifacts-destination", (mlflow_root / "artifacts").as_uri()],
        "api-server": [_bin("airflow"), "api-server", "--host", HOST, "--port", str(airflow_port), "--workers", "1"],
        "scheduler": [_bin("airflow"), "scheduler", "--skip-serve-logs"],
        "dag-processor": [_bin("airflow"), "dag-processor"],
        "triggerer": [_bin("airflow"), "triggerer", "--skip-serve-logs"],
    }


def up(home: Path, data: Path, airflow_port: int = 8080, mlflow_port: int = 5000,
       extra_env: dict[str, str] | None = None, timeout: float = 180) -> dict[str, str]:
    home, data = home.resolve(), data.resolve()
    env = environment(home, data, airflow_port, mlflow_port, extra_env)
    (data / "mlflow").mkdir(parents=True, exist_ok=True)
    (home / "pids").mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    subprocess.run([_bin("airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    for name, argv in commands(data, airflow_port, mlflow_port).items():
        pid_file = home / "pids" / f"{name}.pid"
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            continue
        with open(home / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(proc.pid))
    _wait_http(f"http://{HOST}:{airflow_port}/api/v2/version", timeout, home)
    _wait_http(f"http://{HOST}:{mlflow_port}/health", timeout, home)
    return {"airflow": f"http://{HOST}:{airflow_port}", "mlflow": f"http://{HOST}:{mlflow_port}", "user": USER,
            "password": _secrets(home)["password"]}


def down(home: Path, grace: float = 20) -> list[str]:
    """Stop exactly the stack's processes: SIGTERM to every group at once, then SIGKILL to those still
    alive after `grace` seconds (one shared wait, not one per component)."""
    pid_files = sorted((home / "pids").glob("*.pid")) if (home / "pids").exists() else []
    running = {f.stem: int(f.read_text()) for f in pid_files if _alive(int(f.read_text()))}
    for pid in running.values():
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(pid) for pid in running.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in running.values():
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    for f in pid_files:
        f.unlink()
    return sorted(running)


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait_http(url: str, timeout: float, home: Path) -> None:
    try:
        wait_healthy(url, timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; see the logs in {home / 'logs'}") from None


def main(argv: list[str]) -> int:
    home = Path(os.environ.get("AIRFLOW_HOME", ".airflow"))
    data = Path(os.environ.get("BERTDISTILL_STORE", "data"))
    if argv[:1] == ["up"]:
        info = up(home, data)
        print(f"""
Airflow   {info['airflow']}   login: {info['user']} / {info['password']}
MLflow    {info['mlflow']}
Trigger the DAG 'bert_distillation' from the Airflow UI (Trigger -> the form). Logs: {home}/logs. Stop: make down
""")
        return 0
    if argv[:1] == ["down"]:
        print("stopped:", ", ".join(down(home)) or "nothing was running")
        return 0
    print("usage: python -m bertdistill.orchestration.local_stack up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
