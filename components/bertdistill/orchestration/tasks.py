"""The bodies of the DAG's own (non-step) tasks: small decisions made from the plan and the store.

Kept out of the DAG file so it stays declarative, and importable without Airflow for tests.
They read only manifests (JSON) through store.py; nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bertdistill.manifest import Manifest, read_manifest
from bertdistill.orchestration import plan as planning
from bertdistill.orchestration.settings import Settings

log = logging.getLogger(__name__)


def _manifest(folder_uri: str, name: str = planning.MANIFEST) -> Manifest | None:
    from bertdistill.store import open_folder

    return read_manifest(open_folder(folder_uri), name)


def _tracking_env(settings: Settings) -> None:
    """The tracking settings the steps get, for the MLflow client in this process."""
    from bertdistill import tracking

    os.environ.update({k: v for k, v in settings.step_env().items()
                       if k.startswith("MLFLOW_") or k == tracking.ARTIFACTS_ENV})


def check_dump(params: dict[str, Any], settings: Settings | None = None) -> dict | bool:
    """The plan, or False when this dump was already distilled with these settings (and force is off)."""
    from bertdistill.steps.fetch_dump import Mirror, resolve_date

    settings = settings or Settings.load()
    p = planning.full_params(params)
    date, _ = resolve_date(Mirror(settings.mirror), p["wiki"], p["date"])
    plan = planning.make_plan(p, settings, date)
    folder, _, name = plan["published"].rpartition("/")
    published = _manifest(folder, name)
    if published and not p["force"]:
        log.info("%s %s was already distilled and published (%s, model version %s): nothing to do",
                 p["wiki"], date, plan["student"], published.summary.get("model_version"))
        return False
    log.info("plan: %s %s -> %s", p["wiki"], date, plan["run"])
    return plan


def prepare(plan: dict, run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    from bertdistill import tracking

    settings = settings or Settings.load()
    _tracking_env(settings)
    parent = tracking.start_pipeline(plan["run_name"], plan["params"] | {"date": plan["date"]},
                                     tags={"airflow.run_id": run_id, "bertdistill.run": plan["run"],
                                           "bertdistill.student": plan["student"]})
    return {
        "parent_run_id": parent,
        "ranks": plan["params"]["ranks"],
        "fetch_dump": planning.fetch_dump_args(plan, settings.mirror),
        "build_corpus": planning.build_corpus_args(plan),
        "fetch_teacher": planning.fetch_teacher_args(plan),
        "adapt_teacher": planning.adapt_teacher_args(plan),
        "publish": planning.publish_args(plan),
    }


def make_examples_arguments(plan: dict) -> list[list[str]]:
    """Examples are tokenized with the teacher's own vocab, from the fetched teacher folder."""
    return planning.make_examples_args(plan, f"{plan['teacher']}/vocab.txt")


def extract_arguments(plan: dict) -> list[list[str]]:
    """One extract per file fetch-dump committed (its manifest lists them)."""
    manifest = _manifest(plan["dump_folder"])
    if manifest is None:
        raise RuntimeError(f"{plan['dump_folder']} has no manifest: fetch_dump did not finish")
    names = sorted(n for n in manifest.outputs if ".xml" in n)
    return planning.extract_args(plan, names)


def teacher_has_mlm_head(plan: dict) -> bool:
    manifest = _manifest(plan["teacher"])
    if manifest is None:
        raise RuntimeError(f"{plan['teacher']} has no manifest: fetch_teacher did not finish")
    return "mlm" in manifest.summary.get("heads", [])


def training_arguments(plan: dict) -> dict[str, Any]:
    """Label, distill and evaluate with the adapted teacher when adapt_teacher made one, else the fetched one."""
    teacher = plan["adapted_teacher"] if _manifest(plan["adapted_teacher"]) else plan["teacher"]
    return {"teacher": teacher, "evaluate": planning.evaluate_args(plan, teacher)}


def end_tracking(parent_run_id: str | None, status: str, settings: Settings | None = None) -> None:
    from bertdistill import tracking

    if not parent_run_id:
        return
    _tracking_env(settings or Settings.load())
    tracking.end_pipeline(parent_run_id, status)
