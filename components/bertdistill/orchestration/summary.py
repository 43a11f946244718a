"""What a finished run left in MLflow, printed for a person: `python -m bertdistill.orchestration.summary`.

Exits 1 when no student is registered, so `make demo` fails loudly if the DAG did not publish.
It ends by asking the champion to fill in a few masks, loaded the way `mlflow models serve`
loads it (models:/NAME@champion as a pyfunc), so a person sees what the model knows, and
what it does not.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from bertdistill.orchestration.settings import Settings

PROBES = ("the united [MASK] of america.", "the album was released [MASK] 1998.", "in 1990, he [MASK] to london.",
          "paris is the capital of [MASK].")

# Read once, at import, by TensorFlow's C++ logging (which prints its oneDNN and CPU-feature notices as
# TensorFlow loads, before any Python filter could act) and by MLflow: so set before either is imported.
# Level 2 drops TensorFlow's INFO and WARNING lines and keeps its ERROR and FATAL ones.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_LOGGING_LEVEL": "ERROR",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet() -> None:
    """Keep the libraries' notices out of a summary a person reads.

    Loading the champion imports MLflow and TensorFlow, which warn about how a model was logged
    ("Add type hints ...") and how TensorFlow was built: nothing about this run's result. Errors
    still show: they raise, or print as errors. A variable already set, or -W / PYTHONWARNINGS,
    wins, so `TF_CPP_MIN_LOG_LEVEL=0 python -m bertdistill.orchestration.summary` shows everything.
    """
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
        # MLflow shows its type-hint warning under a filter of its own (catch_warnings + "once"),
        # which outranks the one above; what no filter overrides is how a warning is shown.
        warnings.showwarning = _drop_warning
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # its Python side: notes on tracing, devices


def _drop_warning(*_args: object, **_kwargs: object) -> None:
    """warnings.showwarning for the summary: a library's warning is not shown."""


def main() -> int:
    quiet()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    settings = Settings.load()
    uri = settings.tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bertdistill")
    published = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], "tags.`bertdistill.model_version` LIKE 'models:/%'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if published:
        model = published[0].data.tags["bertdistill.model_version"].split("/")[1]
    else:  # a store whose runs predate that tag: the model registered last
        models = client.search_registered_models(order_by=["last_updated_timestamp DESC"], max_results=1)
        if not models:
            print(f"no pipeline run in {uri} registered a student: the run did not publish", file=sys.stderr)
            return 1
        model = models[0].name
    try:
        champion = client.get_model_version_by_alias(model, "champion")
    except MlflowException:
        print(f"'{model}' has no alias champion in {uri}", file=sys.stderr)
        return 1
    run = client.get_run(champion.run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    parent = client.get_run(parent_id) if parent_id else None
    with tempfile.TemporaryDirectory() as tmp:
        report = json.loads(Path(client.download_artifacts(champion.run_id, "report.json", tmp)).read_text())
    s, t = report["student"], report["teacher"]
    published = run.data.tags.get("bertdistill.output", "-")
    control = f" vs no-teacher control {report['control']['mlm_accuracy']:.1%}" if "control" in report else ""
    print(f"""
MLflow store:      {uri}
pipeline run:      {parent.info.run_name if parent else "-"} {parent_id or ""}
runs table:        (with make up) http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning
registered model:  {model} version {champion.version} (alias champion)
held-out MLM top-1 student {s['mlm_accuracy']:.1%}{control} vs teacher {t['mlm_accuracy']:.1%} \
({report['student_over_teacher']:.1%} kept); baseline {report['baseline']['mlm_accuracy']:.1%}
{report.get('verdict', '')}
student {s['layers']} layers, {s['parameters'] / 1e6:.1f} M parameters; encoder {report['speedup_encoder']:.2f}x faster\
{onnx_line(report)}
published:         {published}  (huggingface/, onnx/, savedmodel/)
in transformers:   from transformers import AutoModelForMaskedLM, AutoTokenizer
                   model = AutoModelForMaskedLM.from_pretrained("{published}/huggingface")

Browse:  make up   then Airflow http://127.0.0.1:8080 and MLflow http://127.0.0.1:5000
   or:   .venv/bin/mlflow ui --host 127.0.0.1 --backend-store-uri {uri}
Serve:   PATH=.venv/bin:$PATH MLFLOW_TRACKING_URI={uri} mlflow models serve -m "models:/{model}@champion" \\
           --env-manager local -h 127.0.0.1 -p 5001     (POST /invocations {{"inputs": {{"text": ["... [MASK] ..."]}}}})
""")
    print(answers(uri, model))
    return 0


def onnx_line(report: dict) -> str:
    """The ONNX exports' figures, on a line of their own, when the report has them."""
    if "onnx" not in report:
        return ""
    o = report["onnx"]
    return (f"\nONNX int8:         top-1 {o['int8']['mlm_accuracy']:.2%} vs fp32 {o['fp32']['mlm_accuracy']:.2%} "
            f"({o['int8_minus_fp32_points']:+.2f} points), {report['speedup_int8_with_mlm_head']:.2f}x the teacher's "
            f"speed; served: {o['serves']}")


def answers(uri: str, model: str) -> str:
    """The champion's top 3 words for each probe, with their probabilities."""
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/{model}@champion")
    if "text" not in served.metadata.get_input_schema().input_names():
        return f"{model}@champion takes token ids (published before fill-mask serving): publish again to ask it\n"
    lines = ["The champion fills in masks (what `mlflow models serve` answers):"]
    for answer in served.predict(pd.DataFrame({"text": PROBES}), params={"top_k": 3}):
        words = ", ".join(f"{w['token']} {w['probability']:.2f}" for w in answer["masks"][0])
        lines.append(f"  {answer['text']:<40} {words}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
