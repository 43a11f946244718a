"""The bodies of the DAG's own (non-step) tasks: small decisions made from the plan and the store.

Each function is the body of the DAG task of the same name. Kept out of the DAG file so it
stays declarative, and importable without Airflow for tests.
They read only manifests (JSON) through store.py; nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from bertdistill.manifest import FOLDER_MANIFEST, Manifest, read_manifest
from bertdistill.orchestration import plan as planning
from bertdistill.orchestration.plan import Plan
from bertdistill.orchestration.settings import Settings

log = logging.getLogger(__name__)

NOTHING_TO_DO = "nothing_to_do"  # check_dump's XCom key: why the run stops there (the listener notes it)


def _manifest(folder_uri: str, name: str = FOLDER_MANIFEST) -> Manifest | None:
    from bertdistill.store import open_folder

    return read_manifest(open_folder(folder_uri), name)


def as_plan(value: Plan | dict) -> Plan:
    """The plan from its XCom form (tasks get JSON; tests may pass the Plan itself)."""
    return value if isinstance(value, Plan) else Plan.from_xcom(value)


def tracking_env(settings: Settings) -> None:
    """The tracking settings the steps get, for the MLflow client in this process."""
    from bertdistill import tracking

    os.environ.update({k: v for k, v in settings.step_env().items()
                       if k.startswith("MLFLOW_") or k == tracking.ARTIFACTS_ENV})


def check_dump(params: dict[str, Any], settings: Settings | None = None, as_of: datetime | None = None
               ) -> tuple[Plan, str | None]:
    """The plan, and why there is nothing to do when this dump was already distilled with these
    settings (and force is off): the run stops there, and its note in Airflow's grid says so.

    `as_of` is the run's own time (Airflow's run_after, kept when the run is cleared): "latest"
    means the newest dump finished by then, so a rerun redoes the same dump. It is also what
    makes the daily schedule cheap: a day with no new dump resolves to a dump already
    published and stops here, after one listing of the mirror and one manifest read.
    """
    from bertdistill.steps.fetch_dump import Mirror, resolve_date, selected_bytes

    settings = settings or Settings.load()
    limit = max_map_length()
    p = planning.full_params(params, limit)
    date, status = resolve_date(Mirror(settings.mirror), p.wiki, p.date, as_of)
    plan = planning.make_plan(params, settings, date, selected_bytes(status, p.max_dump_files), limit)
    if p.warm_start:
        champion = champion_student(plan.model_name, settings)
        plan = planning.make_plan(params, settings, date, selected_bytes(status, p.max_dump_files), limit, champion)
        log.info("warm start: %s", f"from {champion}" if champion else f"no champion of {plan.model_name} yet, so "
                 "the student starts cold")
    if plan.params.train_shards != p.train_shards:
        log.info("%d train shards instead of %d: this dump would give shards over %s MB of examples",
                 plan.params.train_shards, p.train_shards, settings.shard_target_mb)
    folder, _, name = plan.published.rpartition("/")
    published = _manifest(folder, name)
    if published and not p.force:
        reason = (f"{p.wiki} {date} was already distilled and published with these settings, as "
                  f"{plan.model_name} version {published.summary.get('model_version', '?')}; "
                  "set force to distil it again")
        log.info("%s", reason)
        return plan, reason
    log.info("plan: %s %s -> %s", p.wiki, date, plan.run)
    return plan, None


def champion_student(model_name: str, settings: Settings) -> str | None:
    """The student folder of the registered model's champion (publish tags each version with its export/),
    None when nothing has been published under that name yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking_env(settings)
    try:
        version = MlflowClient().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    export = version.tags.get("bertdistill.export")
    return export.removesuffix("/export") if export else None


def max_map_length() -> int:
    """This deployment's [core] max_map_length (Airflow's default outside Airflow)."""
    try:
        from airflow.configuration import conf
    except ImportError:
        return planning.MAX_MAP_LENGTH
    return conf.getint("core", "max_map_length", fallback=planning.MAX_MAP_LENGTH)


def run_name(plan: Plan, run_type: str, started: datetime) -> str:
    """What the MLflow runs table shows: the wiki, its dump date and how and when this run started."""
    how = "monthly" if run_type == "scheduled" else run_type
    return f"{plan.params.wiki} {plan.date} {how} {started:%Y-%m-%d %H:%M:%S}"


def prepare(plan: Plan | dict, run_id: str, dag_id: str = "bert_distillation", run_type: str = "manual",
            settings: Settings | None = None) -> dict[str, Any]:
    from bertdistill import tracking

    plan = as_plan(plan)
    settings = settings or Settings.load()
    tracking_env(settings)
    tags = {"airflow.dag_id": dag_id, "airflow.run_id": run_id, "airflow.run_type": run_type,
            "bertdistill.run": plan.run, "bertdistill.student": plan.student,
            "bertdistill.teacher": plan.teacher_source}
    if settings.airflow_url:
        tags["airflow.url"] = f"{settings.airflow_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}"
    parent = tracking.start_pipeline(run_name(plan, run_type, datetime.now(UTC)),
                                     dataclasses.asdict(plan.params) | {"date": plan.date}, tags=tags)
    return {
        "parent_run_id": parent,
        "ranks": plan.params.ranks,
        "fetch_dump": planning.fetch_dump_args(plan, settings.mirror),
        "fetch_teacher": planning.fetch_teacher_args(plan),
        "adapt_teacher": planning.adapt_teacher_args(plan),
        "publish": planning.publish_args(plan),
    }


def dump_files(plan: Plan | dict) -> list[list[str]]:
    """One extract per file fetch-dump committed (its manifest lists them)."""
    plan = as_plan(plan)
    return planning.extract_args(plan, _fetched(plan))


def corpus(plan: Plan | dict) -> list[str]:
    """build-corpus over exactly the articles of those files."""
    plan = as_plan(plan)
    return planning.build_corpus_args(plan, _fetched(plan))


def _fetched(plan: Plan) -> list[str]:
    manifest = _manifest(plan.dump_folder)
    if manifest is None:
        raise RuntimeError(f"{plan.dump_folder} has no manifest: fetch_dump did not finish")
    return sorted(n for n in manifest.outputs if ".xml" in n)


def example_shards(plan: Plan | dict) -> list[list[str]]:
    """Examples are tokenized with the teacher's own vocab, from the fetched teacher folder."""
    plan = as_plan(plan)
    return planning.make_examples_args(plan, f"{plan.teacher}/vocab.txt")


def teacher_needs_head(plan: Plan | dict) -> bool:
    """True when the fetched teacher has no masked-LM head: adapt_teacher fits one."""
    plan = as_plan(plan)
    manifest = _manifest(plan.teacher)
    if manifest is None:
        raise RuntimeError(f"{plan.teacher} has no manifest: fetch_teacher did not finish")
    return "mlm" not in manifest.summary.get("heads", [])


def teacher_ready(plan: Plan | dict) -> dict[str, Any]:
    """Label, distill and evaluate with the adapted teacher when adapt_teacher made one, else the fetched one."""
    plan = as_plan(plan)
    teacher = plan.adapted_teacher if _manifest(plan.adapted_teacher) else plan.teacher
    return {"teacher": teacher, "evaluate": planning.evaluate_args(plan, teacher)}


def labelled_shards(plan: Plan | dict, teacher: str) -> list[list[str]]:
    return planning.label_teacher_args(as_plan(plan), teacher)


def trainings(plan: Plan | dict, teacher: str) -> list[list[str]]:
    """The student's distill and its no-teacher control's (unless the form turned it off)."""
    return planning.distill_args(as_plan(plan), teacher)
