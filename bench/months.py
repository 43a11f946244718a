"""Two months on the sample: what month two costs warm (reusing month one) against from scratch.

    python bench/months.py [--work data/months] [--conf '{"size": "demo"}']

Runs the DAG with Airflow's own runner (`airflow dags test`) three times on a copy of the
sample's mirror, to which tests/next_dump.py adds enwiki 20160201 (87 articles kept, 15 edited,
4 deleted, 12 new):

1. month one (20160101) into store A;
2. month two from scratch: store A copied to B (so month one's champion and the temporal split
   are the same), then 20160201 with `force` (every step of month two recomputed, the teacher
   adapted again);
3. month two warm in store A: `warm_start` (student and control from month one's champion, 30%
   of the steps at a peak learning rate of 1e-4, half of each batch from the new and changed
   articles and half replay of unchanged examples, whose labels are copied) and month one's
   adapted teacher reused.

Per step, the CPU seconds each step process used (its MLflow run's `step_cpu_seconds`, mapped
tasks summed), then held-out and temporal held-out masked-LM top-1 of student, control, teacher
and champion from each run's report. Needs `make sample` (the demo's sample) first; about 40
minutes on 2 cores at the demo's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
STEPS = ["fetch-dump", "extract", "build-corpus", "make-examples", "fetch-teacher", "adapt-teacher",
         "label-teacher", "distill", "evaluate", "publish"]
FIRST, NEXT = "20160101", "20160201"


def airflow(env: dict, *args: str) -> None:
    proc = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"airflow {' '.join(args[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def month(env: dict, store: Path, db: Path, conf: dict) -> None:
    print(f"running {conf['date']} into {store.name} ({json.dumps(conf)}) ...", flush=True)
    airflow({**env, "BERTDISTILL_STORE": str(store), "BERTDISTILL_MLFLOW_URI": f"sqlite:///{db}"},
            "dags", "test", "bert_distillation", "-c", json.dumps(conf))


def figures(db: Path, date: str) -> tuple[dict[str, float], dict]:
    """(step -> CPU seconds, the evaluate report) of the newest pipeline run of that dump."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("bertdistill")
    runs = client.search_runs([experiment.experiment_id], max_results=5000, order_by=["start_time DESC"])
    parent = next(r for r in runs if r.data.params.get("date") == date and "mlflow.parentRunId" not in r.data.tags)
    cpu: dict[str, float] = defaultdict(float)
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            cpu[run.data.tags.get("bertdistill.step", "?")] += run.data.metrics.get("step_cpu_seconds", 0.0)
    student = parent.data.tags["bertdistill.student"]
    return dict(cpu), json.loads((Path(student) / "report" / "report.json").read_text())


def table(rows: list[tuple[str, dict[str, float]]]) -> None:
    names = [n for n, _ in rows]
    print(f"\n{'CPU seconds':<16}" + "".join(f"{n:>16}" for n in names) + f"{'warm / cold':>14}")
    for step in [*STEPS, "total"]:
        values = [sum(c.values()) if step == "total" else c.get(step, 0.0) for _, c in rows]
        ratio = f"{values[2] / values[1]:.0%}" if values[1] else "-"
        print(f"{step:<16}" + "".join(f"{v:>16.1f}" for v in values) + f"{ratio:>14}")


def accuracy(reports: list[tuple[str, dict]]) -> None:
    print(f"\n{'top-1':<28}" + "".join(f"{n:>16}" for n, _ in reports))
    for split, pick in (("held-out", lambda r: r), ("temporal held-out", lambda r: r.get("temporal", {}))):
        for who in ("student", "control", "teacher", "champion"):
            cells = [pick(r).get(who, {}).get("mlm_accuracy") for _, r in reports]
            print(f"{split + ' ' + who:<28}" + "".join(f"{c:>16.2%}" if c is not None else f"{'-':>16}"
                                                     for c in cells))
    reused = [f"{r.get('champion', {}).get('predictions_reused', '-')} of {r['examples']}" for _, r in reports]
    print(f"{'champion predictions reused':<28}" + "".join(f"{c:>16}" for c in reused))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "months")
    parser.add_argument("--sample", type=Path, default=ROOT / "data" / "sample")
    parser.add_argument("--conf", default='{"size": "demo"}', help="the form's values for all three runs")
    args = parser.parse_args()
    from tests.next_dump import make_next_month

    if not (args.sample / "minilm").is_dir():
        raise SystemExit(f"no sample at {args.sample}: run `make sample` first")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.sample / "mirror", work / "mirror")
    make_next_month(work / "mirror", ROOT / ".cache" / "wheels")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BERTDISTILL_", "MLFLOW_"))}
    env |= {"AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "BERTDISTILL_MIRROR": str(work / "mirror"),
            "BERTDISTILL_TEACHER": str((args.sample / "minilm").resolve()), "TF_CPP_MIN_LOG_LEVEL": "2",
            "BERTDISTILL_MLFLOW_ARTIFACTS": str(work / "artifacts")}
    airflow(env, "db", "migrate")
    conf = json.loads(args.conf)
    a, b = work / "store-a", work / "store-b"
    month(env, a, work / "mlflow-a.db", conf | {"date": FIRST})
    shutil.copytree(a, b)
    shutil.copyfile(work / "mlflow-a.db", work / "mlflow-b.db")
    month(env, b, work / "mlflow-b.db", conf | {"date": NEXT, "force": True})
    month(env, a, work / "mlflow-a.db", conf | {"date": NEXT, "warm_start": True})
    one, two_cold, two_warm = (figures(work / "mlflow-a.db", FIRST), figures(work / "mlflow-b.db", NEXT),
                               figures(work / "mlflow-a.db", NEXT))
    names = ["month one", "two, scratch", "two, warm"]
    table(list(zip(names, (one[0], two_cold[0], two_warm[0]), strict=True)))
    accuracy(list(zip(names, (one[1], two_cold[1], two_warm[1]), strict=True)))


if __name__ == "__main__":
    main()
