"""The DAG file parses, stays free of TensorFlow, and its form refuses bad params before any task runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("airflow")

PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
dag = bag.get_dag("bert_distillation")
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "tensorflow_imported": "tensorflow" in sys.modules,
    "tags": sorted(dag.tags) if dag else [],
    "schedule": str(dag.schedule) if dag else None,
    "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
    "kinds": {t.task_id: getattr(t, "operator_class", type(t)).__name__ for t in dag.tasks} if dag else {},
}))
"""

VALIDATE = """
import copy, json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(sys.argv[1]).get_dag("bert_distillation")
out = {}
for name, conf in json.loads(sys.argv[2]).items():
    params = copy.deepcopy(dag.params)
    try:
        params.update(conf)
        params.validate()
        out[name] = "ok"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def _python(env: dict, code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["local", "kubernetes"])
def test_the_dag_parses_without_tensorflow(airflow_env, mode):
    env = {**airflow_env, "BERTDISTILL_MODE": mode}
    out = _python(env, PARSE, env["AIRFLOW__CORE__DAGS_FOLDER"])
    assert out["errors"] == {}
    assert out["tensorflow_imported"] is False
    assert out["tags"] == ["bertdistill", "distillation", "nlp"]
    assert out["schedule"] == "@monthly"
    steps = ["fetch_dump", "extract", "build_corpus", "make_examples", "fetch_teacher", "adapt_teacher",
             "label_teacher", "distill", "evaluate", "publish"]
    assert all(out["retries"][s] >= 2 for s in steps)
    if mode == "local":
        assert {out["kinds"][s] for s in steps} == {"LocalStepOperator"}
    else:
        assert out["kinds"]["distill"] == "MPIJobOperator"
        # the provider's pod operator, which maps a step's exit code 2 to a failure without retries
        assert {out["kinds"][s] for s in steps if s != "distill"} == {"StepPodOperator"}


def test_the_form_refuses_bad_params(airflow_env):
    cases = {
        "good": {"wiki": "dewiki", "train_steps": 5, "top_k": 10, "control": False},
        "negative_steps": {"train_steps": -1},
        "unknown_wiki": {"wiki": "klingonwiki"},
        "k_above_vocab": {"top_k": 30523},
        "bad_date": {"date": "2026-01-01"},
        "zero_ranks": {"ranks": 0},
        "control_not_a_switch": {"control": "maybe"},
    }
    out = _python(airflow_env, VALIDATE, airflow_env["AIRFLOW__CORE__DAGS_FOLDER"], json.dumps(cases))
    assert out.pop("good") == "ok"
    for name, result in out.items():
        assert result.startswith("ParamValidationError"), (name, result)
    assert "train_steps" in out["negative_steps"] and "klingonwiki" in out["unknown_wiki"]
