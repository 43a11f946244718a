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
dag = bag.dags.get("bert_distillation")
monthly = bag.dags.get("bert_distillation_monthly")
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dag_ids": sorted(bag.dags),
    "tensorflow_imported": "tensorflow" in sys.modules,
    "tags": sorted(dag.tags) if dag else [],
    "schedule": str(dag.schedule) if dag else None,
    "monthly_schedule": str(monthly.schedule) if monthly else None,
    "monthly_paused": monthly.is_paused_upon_creation if monthly else None,
    "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
    "pools": {t.task_id: t.pool for t in dag.tasks} if dag else {},
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} if dag else {},
    "kinds": {t.task_id: getattr(t, "operator_class", type(t)).__name__ for t in dag.tasks} if dag else {},
    "setup_or_teardown": sorted(t.task_id for t in dag.tasks if t.is_setup or t.is_teardown) if dag else [],
    "form": {k: dag.params.get_param(k).schema | {"default": dag.params.get_param(k).value,
                                                   "description": dag.params.get_param(k).description}
             for k in dag.params} if dag else {},
    "monthly_form": {k: monthly.params[k] for k in monthly.params} if monthly else {},
}, default=str))
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
    env = {**airflow_env, "BERTDISTILL_MODE": mode, "BERTDISTILL_GPU_POOL": "gpus"}
    out = _python(env, PARSE, env["AIRFLOW__CORE__DAGS_FOLDER"])
    assert out["errors"] == {}
    assert out["tensorflow_imported"] is False
    assert out["tags"] == ["bertdistill", "distillation", "nlp"]
    # The form's DAG never starts a run by itself; the monthly one starts paused.
    assert out["dag_ids"] == ["bert_distillation", "bert_distillation_monthly"]
    assert out["schedule"] == "None"
    assert out["monthly_schedule"] == "0 3 * * *" and out["monthly_paused"] is True
    # No teardown: it would decide the state of a run marked failed (success) and never run in a paused
    # DAG; the plugin's listener closes MLflow when the run ends (test_listener.py, test_local_stack.py).
    assert out["setup_or_teardown"] == []
    steps = ["fetch_dump", "extract", "build_corpus", "make_examples", "fetch_teacher", "adapt_teacher",
             "label_teacher", "distill", "evaluate", "publish"]
    assert all(out["retries"][s] >= 2 for s in steps)
    # every step waits for prepare's MLflow parent run, passed as a task output (no task id in a template)
    assert all("prepare" in out["upstream"][s] for s in steps)
    assert out["upstream"]["extract"] == ["dump_files", "prepare"]
    if mode == "local":
        assert {out["kinds"][s] for s in steps} == {"LocalStepOperator"}
    else:
        assert out["kinds"]["distill"] == "MPIJobOperator"
        # the GPU steps share the deployment's GPU pool; the others the default one
        assert {s for s in steps if out["pools"][s] == "gpus"} == {"adapt_teacher", "label_teacher", "distill"}
        assert {out["pools"][s] for s in steps} == {"gpus", "default_pool"}
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
        "zero_steps": {"train_steps": 0},
        "negative_files": {"max_dump_files": -3},
        "too_many_shards": {"train_shards": 1001},
        "unknown_size": {"size": "huge"},
        "control_not_a_switch": {"control": "maybe"},
    }
    out = _python(airflow_env, VALIDATE, airflow_env["AIRFLOW__CORE__DAGS_FOLDER"], json.dumps(cases))
    assert out.pop("good") == "ok"
    for name, result in out.items():
        assert result.startswith("ParamValidationError"), (name, result)
    assert "train_steps" in out["negative_steps"] and "klingonwiki" in out["unknown_wiki"]
    # refused, not clamped: Airflow's form clamps to `minimum`/`maximum`, so the form has exclusive bounds
    assert "param train_steps: 0 is less than or equal to the minimum of 0" in out["zero_steps"]
    assert "param max_dump_files: -3" in out["negative_files"] and "1001" in out["too_many_shards"]


def test_no_number_field_is_clamped_by_the_form(airflow_env):
    """The trigger form's number input clamps a value to the schema's minimum and maximum without a
    word (a negative step count became 1): no field has them, every integer field has exclusive bounds."""
    form = _python(airflow_env, PARSE, airflow_env["AIRFLOW__CORE__DAGS_FOLDER"])["form"]
    integers = [name for name, schema in form.items() if "integer" in schema["type"]]
    assert len(integers) == 12
    for name in integers:
        assert "minimum" not in form[name] and "maximum" not in form[name], name
        assert form[name]["exclusiveMinimum"] >= 0, name


def test_every_form_field_says_what_it_is_and_the_switches_are_not_required(airflow_env):
    out = _python(airflow_env, PARSE, airflow_env["AIRFLOW__CORE__DAGS_FOLDER"])
    form = out["form"]
    from bertdistill.orchestration.plan import DEFAULTS

    assert set(form) == set(DEFAULTS)  # every run setting is on the form, and nothing else
    assert form["size"]["enum"] == ["full", "demo"] and form["size"]["default"] == "full"
    for name, schema in form.items():
        assert len(schema["description"] or "") >= 20, name
        assert schema.get("title"), name
    # The UI marks a field required when its type excludes null; a switch with a default is not.
    assert "null" in form["force"]["type"] and "null" in form["control"]["type"]
    assert form["force"]["default"] is False and form["control"]["default"] is True


def test_the_monthly_sizes_come_from_the_deployment_not_the_form(airflow_env):
    env = {**airflow_env, "BERTDISTILL_MONTHLY_PARAMS": json.dumps({"train_shards": 64, "train_steps": 50000})}
    out = _python(env, PARSE, env["AIRFLOW__CORE__DAGS_FOLDER"])
    assert out["errors"] == {}
    assert out["monthly_form"]["train_shards"] == 64 and out["monthly_form"]["train_steps"] == 50000
    assert out["monthly_form"]["dupe_factor"] == out["form"]["dupe_factor"]["default"] == 10
    assert out["form"]["train_shards"]["default"] == 8  # the form's DAG keeps its own defaults

    env["BERTDISTILL_MONTHLY_PARAMS"] = json.dumps({"train_shard": 64})
    out = _python(env, PARSE, env["AIRFLOW__CORE__DAGS_FOLDER"])
    [error] = out["errors"].values()
    assert "BERTDISTILL_MONTHLY_PARAMS" in error and "train_shard" in error and "train_shards" in error


def test_the_plugin_is_registered_once_with_no_import_error(airflow_env):
    """The home page shows Airflow's plugin import errors: the listener's entry point must be found once
    (an editable install's metadata beside the code made it "Plugin 'bertdistill' already registered")."""
    code = ("import json; from airflow import plugins_manager as p; "
            "print(json.dumps({'errors': p.get_import_errors(), 'plugins': [x['name'] for x in p.get_plugin_info()]}))")
    out = _python(airflow_env, code)
    assert out == {"errors": {}, "plugins": ["bertdistill"]}
