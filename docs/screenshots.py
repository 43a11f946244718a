"""The README's screenshots, taken from real runs in a real browser: what a person sees.

    .venv/bin/pip install -e '.[docs]'   # Playwright; the browser is Debian's chromium package
    .venv/bin/python docs/screenshots.py [--out docs] [--keep]

Starts `make up`'s stack (Airflow and MLflow on 127.0.0.1) on a fresh store of its own,
triggers two small runs on the sample through the REST API as the form would (the second
with more train steps, so it reuses the first's examples and labels and trains a new
student), and takes headless-Chromium screenshots of the trigger form, the finished run's
graph, the MLflow runs table with both runs, and copies the second run's evaluate
report.png. Writes small PNGs into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "components"))
CHROMIUM = "/usr/bin/chromium"
# Small enough for minutes on 2 cores, real enough to show real figures: MiniLM adapted 40 steps.
RUN = {"max_dump_files": 1, "train_shards": 2, "heldout_shards": 1, "max_seq_length": 64,
       "max_predictions_per_seq": 10, "dupe_factor": 1, "adapt_steps": 40, "adapt_learning_rate": 0.001,
       "student_layers": 3, "train_steps": 40, "batch_size": 16}
FIGURES = ("student_mlm_accuracy", "control_mlm_accuracy", "teacher_mlm_accuracy", "baseline_mlm_accuracy",
           "distillation_gain")


def call(method: str, url: str, body: dict | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def wait_for(run_url: str, token: str, timeout: float = 1800) -> str:
    deadline = time.monotonic() + timeout
    while (state := call("GET", run_url, token=token)["state"]) not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{run_url} still {state} after {timeout:.0f} s")
        time.sleep(5)
    return state


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(api: str, mlflow: str, user: str, password: str, run_id: str, out: Path) -> None:
    """The trigger form (two sections open), a finished run, the MLflow runs table with its figures."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        page.goto(f"{api}/")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", password)
        page.keyboard.press("Enter")
        page.wait_for_url(lambda u: "login" not in u, timeout=60000)
        page.goto(f"{api}/dags/bert_distillation/runs/{run_id}")
        page.wait_for_timeout(6000)
        page.screenshot(path=str(out / "airflow-run.png"))
        page.set_viewport_size({"width": 1400, "height": 1500})
        page.goto(f"{api}/dags/bert_distillation")
        page.wait_for_timeout(4000)
        page.get_by_role("button", name="Trigger").first.click()
        page.wait_for_timeout(2000)
        for section in ("Data", "Student"):
            page.get_by_text(section, exact=True).last.click()
            page.wait_for_timeout(800)
        page.screenshot(path=str(out / "airflow-trigger-form.png"))
        page.set_viewport_size({"width": 1900, "height": 560})
        experiment = call("GET", f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=bertdistill")
        page.goto(f"{mlflow}/#/experiments/{experiment['experiment']['experiment_id']}/runs"
                  "?workflowType=machine_learning")
        page.wait_for_timeout(6000)
        if page.get_by_role("button", name="Close", exact=True).count():  # the assistant's side panel
            page.get_by_role("button", name="Close", exact=True).first.click()
            page.wait_for_timeout(800)
        page.get_by_role("button", name="Columns").click()
        page.wait_for_timeout(1000)
        for column in ("Dataset", "Source", "Models"):  # room for the figures
            page.get_by_text(column, exact=True).last.click()
        for metric in FIGURES:
            page.get_by_placeholder("Search columns").fill(metric)
            page.wait_for_timeout(500)
            page.get_by_text(metric, exact=True).last.click()
        page.keyboard.press("Escape")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "mlflow-runs.png"))
        browser.close()
    for name in ("airflow-run.png", "airflow-trigger-form.png", "mlflow-runs.png"):
        shrink(out / name)


def shrink(path: Path) -> None:
    """Screenshots are flat UI colours: a 256-colour palette keeps them legible at a third of the bytes."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256)
    small.save(path, optimize=True)


def main() -> None:
    from bertdistill.orchestration import local_stack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--keep", action="store_true", help="leave the stack and its store running")
    args = parser.parse_args()
    sample = ROOT / "data" / "sample"
    if not (sample / ".done").exists():
        raise SystemExit("no sample: run `make sample` first")
    root = Path(tempfile.mkdtemp(prefix="bertdistill-screens-"))
    extra = {"BERTDISTILL_MIRROR": str(sample / "mirror"), "BERTDISTILL_TEACHER": str(sample / "minilm"),
             "PYTHONPATH": str(ROOT / "components")}
    info = local_stack.up(root / "airflow", root / "data", free_port(), free_port(), extra_env=extra, timeout=300)
    try:
        api = info["airflow"]
        token = call("POST", f"{api}/auth/token", {"username": info["user"], "password": info["password"]})[
            "access_token"]
        while True:
            try:
                call("PATCH", f"{api}/api/v2/dags/bert_distillation", {"is_paused": False}, token)
                break
            except urllib.error.HTTPError:  # not parsed yet
                time.sleep(3)
        runs = []
        for steps in (40, 80):
            run = call("POST", f"{api}/api/v2/dags/bert_distillation/dagRuns",
                       {"logical_date": None, "conf": {**RUN, "train_steps": steps}}, token)
            url = f"{api}/api/v2/dags/bert_distillation/dagRuns/{run['dag_run_id']}"
            print(f"run {run['dag_run_id']}: {wait_for(url, token)}", flush=True)
            runs.append(run["dag_run_id"])
        shoot(api, info["mlflow"], info["user"], info["password"], runs[-1], args.out)
        reports = sorted((root / "data" / "runs").glob("*/students/*/report/report.png"),
                         key=lambda p: p.stat().st_mtime)
        shutil.copyfile(reports[-1], args.out / "evaluate-report.png")
        shrink(args.out / "evaluate-report.png")
        print(f"screenshots in {args.out}; stack data in {root}")
    finally:
        if not args.keep:
            local_stack.down(root / "airflow")


if __name__ == "__main__":
    main()
