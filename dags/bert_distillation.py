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
stopped. Results: MLflow, one parent run per DAG run with a child run per step, opened by
`prepare` and closed by the plugin's listener when the run ends however it ends (succeeded,
failed, marked failed by hand), so MLflow and Airflow agree; there is no teardown task, because
a teardown would decide the state of a run marked failed (see docs/pipeline.md).

Two DAGs from one definition. `bert_distillation` has no schedule: a person triggers it from
the form, and unpausing it starts nothing by itself. `bert_distillation_monthly` is the
monthly refresh: it checks daily for a newer finished dump (a day with nothing new stops at
`check_dump`), so each monthly dump is distilled once, within a day of finishing, with the
sizes the deployment sets (BERTDISTILL_MONTHLY_PARAMS, a JSON object over the form's
defaults), never the form's; it is paused until an operator unpauses it, and unpausing it
starts one run for the latest day, which stops at `check_dump` when nothing new is published.
"latest" means the newest dump finished at the run's own time, so a cleared run redoes the same
dump. Pausing does not stop a running run: mark it failed (the step running is killed, MLflow
shows the pipeline's run KILLED).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, TriggerRule, dag, task

from bertdistill.orchestration.plan import DEFAULTS, DEMO, SIZES
from bertdistill.orchestration.runners import StepOperators
from bertdistill.orchestration.settings import Settings

SETTINGS = Settings.load()

WIKIS = ["enwiki", "simplewiki", "dewiki", "frwiki", "eswiki", "itwiki", "nlwiki", "plwiki", "ptwiki", "svwiki"]
VOCAB_SIZE = 30522  # bert-base-uncased, the default teachers' vocab; check_dump checks the real teacher's


def between(low: int, high: int) -> dict[str, int]:
    """An integer field's bounds as exclusive ones: Airflow's form clamps a number to `minimum` and
    `maximum` without a word, while exclusive bounds let the value through to the schema check,
    which refuses it with a message naming the field (the REST API refuses it the same way)."""
    return {"exclusiveMinimum": low - 1, "exclusiveMaximum": high + 1}


def form(defaults: dict) -> dict[str, Param]:
    """The trigger form. Costs are rough figures measured on 2 CPU cores with MiniLM (6 x 384)."""
    d = defaults
    return {
        "wiki": Param(d["wiki"], type="string", enum=WIKIS, title="Wiki", section="Data",
                      description="Wikipedia database to distil on (enwiki: about 22 GB compressed)"),
        "date": Param(d["date"], type="string", pattern=r"^(latest|\d{8})$", title="Dump date", section="Data",
                      description="YYYYMMDD, or latest: the newest finished dump"),
        "max_dump_files": Param(d["max_dump_files"], type=["null", "integer"], exclusiveMinimum=0,
                                title="Max dump files", section="Data",
                                description="first N pages-articles files only (empty: all; "
                                "enwiki has about 60, each about 400 MB compressed)"),
        "train_shards": Param(d["train_shards"], type="integer", **between(1, 1000), title="Train shards",
                              section="Data", description="text shards for training: each is one make-examples and "
                              "one label-teacher task, run in parallel; more shards, smaller tasks (train + held-out "
                              "shards at most Airflow's max_map_length, 1,024 by default)"),
        "heldout_shards": Param(d["heldout_shards"], type="integer", **between(1, 24),
                                title="Held-out shards", section="Data",
                                description="shards kept out of training, for evaluate (shards are equal shares "
                                "of the documents: 1 of 8 + 1 holds about 11%)"),
        "max_seq_length": Param(d["max_seq_length"], type="integer", **between(16, 512),
                                title="Sequence length", section="Examples",
                                description="tokens per example; time per step grows about linearly up to 128 "
                                "and faster beyond (attention)"),
        "max_predictions_per_seq": Param(d["max_predictions_per_seq"], type="integer", **between(1, 80),
                                         title="Masked positions", section="Examples",
                                         description="most masked tokens per example (about 15% of its length); "
                                         "label bytes grow in proportion"),
        "dupe_factor": Param(d["dupe_factor"], type="integer", **between(1, 100), title="Dupe factor",
                             section="Examples", description="passes over the text with different masks: examples, "
                             "label-teacher time and storage (about 0.6 KB per example at 128 tokens) grow in "
                             "proportion"),
        "teacher": Param(d["teacher"], type=["null", "string"], minLength=1, title="Teacher source",
                         section="Teacher", description="Google BERT zip URL/path or Hugging Face folder (empty: "
                         "the configured default)"),
        "adapt_steps": Param(d["adapt_steps"], type="integer", **between(1, 100000), title="Adaptation steps",
                             section="Teacher", description="masked-LM head fitting, only for teachers without one "
                             "(about 1.2 s per step of 32 x 64 tokens on 2 CPU cores)"),
        "adapt_learning_rate": Param(d["adapt_learning_rate"], type="number", exclusiveMinimum=0, maximum=0.01,
                                     title="Adaptation learning rate", section="Teacher",
                                     description="peak learning rate of the head fitting (AdamW, warm-up then "
                                     "linear decay)"),
        "top_k": Param(d["top_k"], type="integer", **between(1, VOCAB_SIZE), title="Top k", section="Teacher",
                       description="teacher probabilities cached per masked position (about 3 bytes each)"),
        "student_layers": Param(d["student_layers"], type="integer", **between(1, 24), title="Student layers",
                                section="Student", description="encoder layers of the student, taken from evenly "
                                "spaced teacher layers; time per step is about proportional"),
        "train_steps": Param(d["train_steps"], type="integer", **between(1, 10_000_000), title="Train steps",
                             section="Student", description="optimizer steps of the student (about 0.75 s per step "
                             "of 32 x 64 tokens for 3 x 384 on 2 CPU cores); the control trains as many. The "
                             "teacher labels only what training reads: train steps x batch size x ranks examples, "
                             "spread over the train shards"),
        "batch_size": Param(d["batch_size"], type="integer", **between(1, 4096), title="Batch size",
                            section="Student", description="examples per micro-batch and rank; ranks x batch size "
                            "= global batch"),
        "ranks": Param(d["ranks"], type="integer", **between(1, 256), title="Horovod ranks", section="Student",
                       description="training processes: GPUs of the MPIJob in Kubernetes, local processes in the "
                       "embedded mode; the global batch stays the same at any count; at most Train shards "
                       "(each rank reads its own)"),
        "control": Param(d["control"], type=["boolean", "null"], title="No-teacher control", section="Student",
                         description="also train the same student without the teacher (hard labels only, same "
                         "init, data and steps; doubles training time): the report then gives the distillation "
                         "gain with its 95% interval"),
        "warm_start": Param(d["warm_start"], type=["boolean", "null"], title="Warm start", section="Student",
                            description="start the student (and its control) from the current champion of the "
                            "same kind instead of the teacher's layers, and train Warm-start fraction of the "
                            "steps: a monthly refresh that continues last month's model; cold when there is no "
                            "champion yet"),
        "warm_start_fraction": Param(d["warm_start_fraction"], type="number", exclusiveMinimum=0, maximum=1,
                                     title="Warm-start fraction", section="Student",
                                     description="the fraction of Train steps a warm-started student trains"),
        "warm_start_learning_rate": Param(d["warm_start_learning_rate"], type="number", exclusiveMinimum=0,
                                          title="Warm-start learning rate", section="Student",
                                          description="the peak learning rate of a warm-started student (a cold "
                                          "one peaks at distill's default, 5e-4): lower keeps more of the champion"),
        "fresh_share": Param(d["fresh_share"], type="number", minimum=0, exclusiveMaximum=1,
                             title="Fresh share", section="Student",
                             description="the share of a warm-started student's examples drawn from the articles "
                             "new or changed since last month (the rest replays the whole month); 0: the whole "
                             "month only"),
        "size": Param(d["size"], type="string", enum=list(SIZES), title="Size", section="Run",
                      description="demo: the sizes of make demo for every size field left at its default ("
                      f"{DEMO['max_dump_files']} dump file, {DEMO['train_shards']} + {DEMO['heldout_shards']} shards, "
                      f"{DEMO['max_seq_length']} tokens, {DEMO['adapt_steps']} adaptation and {DEMO['train_steps']} "
                      "train steps: about 15 minutes on 2 CPU cores); full: every field as it is (the defaults "
                      "are a real run: hours on a laptop)"),
        "force": Param(d["force"], type=["boolean", "null"], title="Force", section="Run",
                       description="redo every step even if done, and distil a dump that was already distilled"),
    }


def distillation(dag_id: str, schedule: str | None, defaults: dict, **kwargs):
    """One pipeline definition; `bert_distillation` and `bert_distillation_monthly` differ in schedule and sizes."""

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        params=form(defaults),
        tags=["bertdistill", "nlp", "distillation"],
        doc_md=__doc__,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
                      "max_retry_delay": timedelta(minutes=10)},
        **kwargs,
    )
    def pipeline():
        @task.short_circuit
        def check_dump(**context) -> dict | bool:
            """Resolve the dump date; stop the run here if this dump was already distilled (unless force).

            Settings that cannot run fail the task at once with their one-line reason (retrying cannot
            help); an unreachable mirror is left to the retries."""
            from airflow.sdk.exceptions import AirflowFailException

            from bertdistill.errors import StepError, TransientError
            from bertdistill.orchestration import tasks

            try:
                plan, nothing_to_do = tasks.check_dump(dict(context["params"]), as_of=context["dag_run"].run_after)
            except TransientError:
                raise
            except (StepError, ValueError) as exc:
                raise AirflowFailException(str(exc)) from None
            if nothing_to_do:
                context["ti"].xcom_push(key=tasks.NOTHING_TO_DO, value=nothing_to_do)  # the run's note says why
                return False
            return plan.to_xcom()

        @task(multiple_outputs=True)
        def prepare(plan: dict, **context) -> dict:
            """Open the MLflow parent run (the listener closes it); every step's arguments known now."""
            from bertdistill.orchestration import tasks

            run_type = context["dag_run"].run_type
            return tasks.prepare(plan, run_id=context["run_id"], dag_id=context["dag"].dag_id,
                                 run_type=getattr(run_type, "value", run_type))

        @task
        def dump_files(plan: dict) -> list[list[str]]:
            """One extract per file fetch_dump committed."""
            from bertdistill.orchestration import tasks

            return tasks.dump_files(plan)

        @task
        def corpus(plan: dict) -> list[str]:
            """build_corpus over the articles of exactly those files."""
            from bertdistill.orchestration import tasks

            return tasks.corpus(plan)

        @task
        def example_shards(plan: dict) -> list[list[str]]:
            from bertdistill.orchestration import tasks

            return tasks.example_shards(plan)

        @task.branch
        def teacher_needs_head(plan: dict) -> str:
            from bertdistill.orchestration import tasks

            return "adapt_teacher" if tasks.teacher_needs_head(plan) else "teacher_ready"

        @task(multiple_outputs=True, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
        def teacher_ready(plan: dict) -> dict:
            from bertdistill.orchestration import tasks

            return tasks.teacher_ready(plan)

        @task
        def labelled_shards(plan: dict, teacher: str) -> list[list[str]]:
            from bertdistill.orchestration import tasks

            return tasks.labelled_shards(plan, teacher)

        @task
        def trainings(plan: dict, teacher: str) -> list[list[str]]:
            """The student's distill and its no-teacher control's (unless the form turned it off)."""
            from bertdistill.orchestration import tasks

            return tasks.trainings(plan, teacher)

        plan = check_dump()
        args = prepare(plan)
        # every step gets the MLflow parent run prepare opened, and distill its rank count
        steps = StepOperators(SETTINGS, parent_run=args["parent_run_id"], ranks=args["ranks"])
        fetch_dump = steps.single("fetch_dump", args["fetch_dump"])
        files = dump_files(plan)
        extract = steps.mapped("extract", files)
        corpus_args = corpus(plan)
        build_corpus = steps.single("build_corpus", corpus_args)
        make_examples = steps.mapped("make_examples", example_shards(plan))
        fetch_teacher = steps.single("fetch_teacher", args["fetch_teacher"])
        needs_head = teacher_needs_head(plan)
        adapt = steps.single("adapt_teacher", args["adapt_teacher"])
        ready = teacher_ready(plan)
        label = steps.mapped("label_teacher", labelled_shards(plan, ready["teacher"]))
        distill = steps.distill("distill", trainings(plan, ready["teacher"]))
        evaluate = steps.single("evaluate", ready["evaluate"])
        publish = steps.single("publish", args["publish"])

        fetch_dump >> [files, corpus_args]
        files >> extract >> build_corpus >> make_examples
        fetch_teacher >> make_examples >> needs_head >> [adapt, ready]
        adapt >> ready >> label >> distill >> evaluate >> publish

    return pipeline()


manual = distillation("bert_distillation", None, DEFAULTS)
monthly = distillation("bert_distillation_monthly", "0 3 * * *", DEFAULTS | SETTINGS.monthly_overrides(),
                       is_paused_upon_creation=True)
