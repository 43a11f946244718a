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
from bertdistill.orchestration import step_args
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
    champion = champion_student(plan.model_name, settings) if p.warm_start else None
    if p.warm_start:
        log.info("warm start: %s", f"from {champion}" if champion else f"no champion of {plan.model_name} yet, so "
                 "the student starts cold")
    previous = previous_month(plan)
    if champion or previous:
        plan = planning.make_plan(params, settings, date, selected_bytes(status, p.max_dump_files), limit, champion,
                                  previous)
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


def earlier_months(plan: Plan) -> list[str]:
    """Dates of this wiki's dumps fetched into the store before this one, newest first."""
    from bertdistill.store import open_folder

    dumps = open_folder(plan.dump_folder.rsplit("/", 1)[0])
    dates = {name.split("/", 1)[0] for name in dumps.list() if "/" in name}
    return sorted((d for d in dates if d < plan.date), reverse=True)


def previous_month(plan: Plan) -> str | None:
    """The date of the newest earlier month whose text was built with these settings: build-corpus
    compares this month's articles with its own to find what is new or changed (the temporal held-out)."""
    return next((d for d in earlier_months(plan) if _manifest(planning.in_month(plan, plan.text, d))), None)


def reusable_adapted_teacher(plan: Plan) -> str | None:
    """An earlier month's adapted teacher of the same teacher, settings and kind of examples, when the
    fetched teacher is still the one it was adapted from: fitting the head again on this month's
    text would cost adapt-teacher's whole run to end near the same place (`force` refits)."""
    from bertdistill.manifest import input_fingerprint

    if plan.params.force:
        return None
    teacher = f"{plan.teacher} {input_fingerprint(plan.teacher)}"
    for date in earlier_months(plan):
        folder = planning.in_month(plan, plan.adapted_teacher, date)
        manifest = _manifest(folder)
        if manifest and manifest.inputs.get("teacher") == teacher:
            return folder
    return None


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
            "bertdistill.teacher": plan.teacher_source, "bertdistill.dump": f"{plan.params.wiki} {plan.date}"}
    if settings.airflow_url:
        tags["airflow.url"] = f"{settings.airflow_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}"
    parent = tracking.start_pipeline(run_name(plan, run_type, datetime.now(UTC)),
                                     dataclasses.asdict(plan.params) | {"date": plan.date}, tags=tags)
    return {
        "parent_run_id": parent,
        "ranks": plan.params.ranks,
        "fetch_dump": step_args.fetch_dump_args(plan, settings.mirror),
        "fetch_teacher": step_args.fetch_teacher_args(plan),
        "adapt_teacher": step_args.adapt_teacher_args(plan),
        "publish": step_args.publish_args(plan),
    }


def dump_files(plan: Plan | dict) -> list[list[str]]:
    """One extract per file fetch-dump committed (its manifest lists them), copying the articles of
    unchanged pages from the previous month's when there is one."""
    plan = as_plan(plan)
    return step_args.extract_args(plan, _fetched(plan), _previous_articles(plan))


def corpus(plan: Plan | dict) -> list[str]:
    """build-corpus over exactly the articles of those files, compared with the previous month's
    articles (those its text was built from) when there is one."""
    plan = as_plan(plan)
    return step_args.build_corpus_args(plan, _fetched(plan), _previous_articles(plan))


def _previous_articles(plan: Plan) -> list[str]:
    """The articles folders the previous month's text was built from (its manifest names them)."""
    if not plan.previous:
        return []
    text = _manifest(planning.in_month(plan, plan.text, plan.previous))
    return [value.split(" ", 1)[0] for role, value in sorted(text.inputs.items()) if role.startswith("articles")]


def _fetched(plan: Plan) -> list[str]:
    manifest = _manifest(plan.dump_folder)
    if manifest is None:
        raise RuntimeError(f"{plan.dump_folder} has no manifest: fetch_dump did not finish")
    return sorted(n for n in manifest.outputs if ".xml" in n)


def example_shards(plan: Plan | dict) -> list[list[str]]:
    """Examples are tokenized with the teacher's own vocab, from the fetched teacher folder."""
    plan = as_plan(plan)
    return step_args.make_examples_args(plan, f"{plan.teacher}/vocab.txt")


def teacher_needs_head(plan: Plan | dict) -> bool:
    """True when the fetched teacher has no masked-LM head and no earlier month fitted one with these
    settings: adapt_teacher fits one."""
    plan = as_plan(plan)
    manifest = _manifest(plan.teacher)
    if manifest is None:
        raise RuntimeError(f"{plan.teacher} has no manifest: fetch_teacher did not finish")
    if "mlm" in manifest.summary.get("heads", []):
        return False
    if _manifest(plan.adapted_teacher):  # this month's, made before (adapt-teacher finds it done)
        return True
    reused = reusable_adapted_teacher(plan)
    if reused:
        log.info("adapt_teacher skipped: %s fitted the head with these settings on the same teacher", reused)
    return reused is None


def teacher_ready(plan: Plan | dict) -> dict[str, Any]:
    """Label, distill and evaluate with the adapted teacher this month made, else an earlier month's
    adapted with the same settings, else the fetched one (a teacher with its own head)."""
    plan = as_plan(plan)
    teacher = (plan.adapted_teacher if _manifest(plan.adapted_teacher) else None) or \
        reusable_adapted_teacher(plan) or plan.teacher
    return {"teacher": teacher, "evaluate": step_args.evaluate_args(plan, teacher)}


def labelled_shards(plan: Plan | dict, teacher: str) -> list[list[str]]:
    return step_args.label_teacher_args(as_plan(plan), teacher)


def trainings(plan: Plan | dict, teacher: str) -> list[list[str]]:
    """The student's distill and its no-teacher control's (unless the form turned it off)."""
    return step_args.distill_args(as_plan(plan), teacher)
