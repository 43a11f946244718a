"""
### Distil a small BERT from a big one on fresh Wikipedia

One run: fetch a Wikipedia dump, extract and split it into sentence shards, turn each shard
into masked-LM + next-sentence examples, prepare the teacher (fit a masked-LM head when it
has none), cache the teacher's top-k outputs, train the student (Horovod over N ranks),
evaluate it against the teacher and against a no-teacher control (the same student trained
on the hard labels alone) on held-out shards, and publish it to the MLflow registry,
where the alias `champion` moves only when it is better.

Every box is one `bertdistill <step>`: a child process in the embedded mode, a pod (and an
MPIJob for distill) in the `kubernetes` mode, chosen by the BERTDISTILL_MODE setting. Each
step skips work its output's manifest says is done, so a rerun resumes where a killed run
stopped. The monthly schedule picks up each new dump; a month with no new dump stops after
`check_dump`. Results: MLflow, one parent run per DAG run with a child run per step.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, TriggerRule, dag, task

from bertdistill.orchestration.runners import StepOperators
from bertdistill.orchestration.settings import Settings

SETTINGS = Settings.load()
steps = StepOperators(SETTINGS)

WIKIS = ["enwiki", "simplewiki", "dewiki", "frwiki", "eswiki", "itwiki", "nlwiki", "plwiki", "ptwiki", "svwiki"]
VOCAB_SIZE = 30522  # bert-base-uncased, the default teachers' vocab; check_dump checks the real teacher's

PARAMS = {
    "wiki": Param("enwiki", type="string", enum=WIKIS, title="Wiki", section="Data",
                  description="Wikipedia database to distil on"),
    "date": Param("latest", type="string", pattern=r"^(latest|\d{8})$", title="Dump date", section="Data",
                  description="YYYYMMDD, or latest: the newest finished dump"),
    "max_dump_files": Param(None, type=["null", "integer"], minimum=1, title="Max dump files", section="Data",
                            description="first N pages-articles files only (empty: all)"),
    "train_shards": Param(8, type="integer", minimum=1, maximum=4096, title="Train shards", section="Data"),
    "heldout_shards": Param(1, type="integer", minimum=1, maximum=64, title="Held-out shards", section="Data"),
    "max_seq_length": Param(128, type="integer", minimum=16, maximum=512, title="Sequence length",
                            section="Examples"),
    "max_predictions_per_seq": Param(20, type="integer", minimum=1, maximum=80, title="Masked positions",
                                     section="Examples"),
    "dupe_factor": Param(10, type="integer", minimum=1, maximum=100, title="Dupe factor", section="Examples",
                         description="passes over the text with different masks"),
    "teacher": Param(None, type=["null", "string"], minLength=1, title="Teacher source", section="Teacher",
                     description="Google BERT zip URL/path or Hugging Face folder (empty: the configured default)"),
    "adapt_steps": Param(300, type="integer", minimum=1, maximum=100000, title="Adaptation steps",
                         section="Teacher", description="masked-LM head fitting, for teachers without one"),
    "adapt_learning_rate": Param(4e-4, type="number", exclusiveMinimum=0, maximum=0.01,
                                 title="Adaptation learning rate", section="Teacher",
                                 description="peak learning rate of the head fitting (AdamW)"),
    "top_k": Param(10, type="integer", minimum=1, maximum=VOCAB_SIZE, title="Top k", section="Teacher",
                   description="teacher probabilities cached per masked position"),
    "student_layers": Param(3, type="integer", minimum=1, maximum=24, title="Student layers", section="Student"),
    "train_steps": Param(10000, type="integer", minimum=1, maximum=10_000_000, title="Train steps",
                         section="Student"),
    "batch_size": Param(32, type="integer", minimum=1, maximum=4096, title="Batch size", section="Student",
                        description="examples per micro-batch; ranks x batch size = global batch"),
    "ranks": Param(1, type="integer", minimum=1, maximum=256, title="Horovod ranks", section="Student"),
    "control": Param(True, type="boolean", title="No-teacher control", section="Student",
                     description="also train the same student without the teacher (hard labels only, same "
                     "init, data and steps): the report then gives the distillation gain with its 95% interval"),
    "force": Param(False, type="boolean", title="Force", section="Run",
                   description="redo every step even if done, and distil a dump that was already distilled"),
}


@dag(
    dag_id="bert_distillation",
    schedule="@monthly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["bertdistill", "nlp", "distillation"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
                  "max_retry_delay": timedelta(minutes=10)},
)
def bert_distillation():
    @task.short_circuit
    def check_dump(**context) -> dict | bool:
        """Resolve the dump date; stop the run here if this dump was already distilled (unless force)."""
        from bertdistill.orchestration.tasks import check_dump

        return check_dump(dict(context["params"]))

    @task(multiple_outputs=True)
    def prepare(plan: dict, **context) -> dict:
        """Open the MLflow parent run; every step's arguments that do not depend on earlier outputs."""
        from bertdistill.orchestration.tasks import prepare

        return prepare(plan, run_id=context["run_id"])

    @task
    def dump_files(plan: dict) -> list[list[str]]:
        from bertdistill.orchestration.tasks import extract_arguments

        return extract_arguments(plan)

    @task
    def example_shards(plan: dict) -> list[list[str]]:
        from bertdistill.orchestration.tasks import make_examples_arguments

        return make_examples_arguments(plan)

    @task
    def labelled_shards(plan: dict, teacher: str) -> list[list[str]]:
        from bertdistill.orchestration.plan import label_teacher_args

        return label_teacher_args(plan, teacher)

    @task
    def trainings(plan: dict, teacher: str) -> list[list[str]]:
        """The student's distill and its no-teacher control's (unless the form turned it off)."""
        from bertdistill.orchestration.plan import distill_args

        return distill_args(plan, teacher)

    @task.branch
    def teacher_needs_head(plan: dict) -> str:
        from bertdistill.orchestration.tasks import teacher_has_mlm_head

        return "teacher_ready" if teacher_has_mlm_head(plan) else "adapt_teacher"

    @task(multiple_outputs=True, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def teacher_ready(plan: dict) -> dict:
        from bertdistill.orchestration.tasks import training_arguments

        return training_arguments(plan)

    @task(trigger_rule=TriggerRule.ALL_SUCCESS)
    def finish_tracking(**context) -> None:
        from bertdistill.orchestration.tasks import end_tracking

        end_tracking(context["ti"].xcom_pull(task_ids="prepare", key="parent_run_id"), "FINISHED")

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
    def fail_tracking(**context) -> None:
        from bertdistill.orchestration.tasks import end_tracking

        end_tracking(context["ti"].xcom_pull(task_ids="prepare", key="parent_run_id"), "FAILED")

    plan = check_dump()
    args = prepare(plan)
    fetch_dump = steps.single("fetch_dump", args["fetch_dump"])
    files = dump_files(plan)
    extract = steps.mapped("extract", files)
    build_corpus = steps.single("build_corpus", args["build_corpus"])
    make_examples = steps.mapped("make_examples", example_shards(plan))
    fetch_teacher = steps.single("fetch_teacher", args["fetch_teacher"])
    needs_head = teacher_needs_head(plan)
    adapt = steps.single("adapt_teacher", args["adapt_teacher"])
    ready = teacher_ready(plan)
    label = steps.mapped("label_teacher", labelled_shards(plan, ready["teacher"]))
    distill = steps.distill("distill", trainings(plan, ready["teacher"]))
    evaluate = steps.single("evaluate", ready["evaluate"])
    publish = steps.single("publish", args["publish"])
    done, failed = finish_tracking(), fail_tracking()

    fetch_dump >> files >> extract >> build_corpus >> make_examples
    fetch_teacher >> make_examples >> needs_head >> [adapt, ready]
    adapt >> ready >> label >> distill >> evaluate >> publish >> [done, failed]
    [fetch_dump, extract, build_corpus, make_examples, fetch_teacher, adapt, label, distill, evaluate] >> failed


bert_distillation()
