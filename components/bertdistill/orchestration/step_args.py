"""Every step's command line (after `bertdistill`), from the run plan (plan.py).

Pure functions of the Plan, like the plan itself: the DAG's tasks, the local runner and the pods all
run what these return, so a test of the arguments is a test of what each step will be asked to do.
"""

from __future__ import annotations

import math

from bertdistill.flags import default
from bertdistill.orchestration.plan import (
    Plan,
    articles_folder,
    control_folder,
    examples_key,
    fresh_share,
    in_month,
    join_uri,
    labels_folder,
    text_shards,
    train_labels_per_shard,
    train_steps,
)
from bertdistill.steps.evaluate import EvaluateParams


def fetch_dump_args(plan: Plan, mirror: str) -> list[str]:
    p = plan.params
    args = ["fetch-dump", "--wiki", p.wiki, "--date", plan.date, "--mirror", mirror, "--output", plan.dumps]
    if p.max_dump_files:
        args += ["--max-files", str(p.max_dump_files)]
    return args + _force(plan)


def extract_args(plan: Plan, dump_files: list[str], previous_articles: list[str] = ()) -> list[list[str]]:
    """One extract per dump file, each into its own articles/<file>/ folder. Each is given all of last
    month's articles (`previous_articles`), not a file's namesake: a page may move between a dump's files.
    `force` extracts everything again."""
    reuse = ["--reuse", *previous_articles] if previous_articles and not plan.params.force else []
    return [["extract", "--input", join_uri(plan.dump_folder, name),
             "--output", articles_folder(plan, name), *reuse, *_force(plan)] for name in dump_files]


def build_corpus_args(plan: Plan, dump_files: list[str], previous_articles: list[str] = ()) -> list[str]:
    """The articles of these dump files only: a trial on the first N never reads the full run's others.
    `previous_articles` (last month's, as its text manifest lists them) adds the temporal split."""
    p = plan.params
    previous = ["--previous", *previous_articles] if previous_articles else []
    return ["build-corpus", "--input", *[articles_folder(plan, n) for n in dump_files], "--output", plan.text,
            "--train-shards", str(p.train_shards), "--heldout-shards", str(p.heldout_shards), *previous,
            *_force(plan)]


def make_examples_args(plan: Plan, vocab_file: str) -> list[list[str]]:
    p = plan.params
    return [["make-examples", "--input", join_uri(plan.text, f"{s}.txt"),
             "--output", join_uri(plan.examples, f"{s}.tfrecord"), "--vocab-file", vocab_file,
             "--max-seq-length", str(p.max_seq_length), "--max-predictions-per-seq",
             str(p.max_predictions_per_seq), "--dupe-factor", str(p.dupe_factor), *_force(plan)]
            for s in text_shards(plan)]


def fetch_teacher_args(plan: Plan) -> list[str]:
    return ["fetch-teacher", "--source", plan.teacher_source, "--output", plan.teacher]


def adapt_teacher_args(plan: Plan) -> list[str]:
    return ["adapt-teacher", "--teacher", plan.teacher, "--examples", plan.examples, "--output",
            plan.adapted_teacher, "--steps", str(plan.params.adapt_steps), "--learning-rate",
            str(plan.params.adapt_learning_rate), *_force(plan)]


def label_teacher_args(plan: Plan, teacher: str) -> list[list[str]]:
    """One labelling per shard, of as many examples as distill (train) or evaluate (held-out) reads;
    with a month before (and no `force`), copying the labels of the examples it made the same. A warm
    start that draws the new and changed articles from the fresh shard replays only unchanged
    examples from the train shards (`--replay`): they need no teacher."""
    p = plan.params
    labels = labels_folder(plan, teacher)
    heldout = default(EvaluateParams, "max_examples")
    fresh = math.ceil(train_steps(plan) * p.batch_size * fresh_share(plan))  # what one group draws
    cap = {"train": train_labels_per_shard(plan), "heldout": heldout, "temporal": heldout, "fresh": fresh}
    reuse = []
    if plan.previous and not p.force:
        reuse = ["--reuse", in_month(plan, join_uri(plan.run, "labels", examples_key(p)), plan.previous)]
    return [["label-teacher", "--teacher", teacher, "--input", join_uri(plan.examples, f"{s}.tfrecord"),
             "--output", join_uri(labels, f"{s}.tfrecord"), "--top-k", str(p.top_k),
             "--max-examples", str(cap[s.split("/")[0]]), *reuse,
             *(["--replay"] if reuse and fresh_share(plan) and s.startswith("train/") else []), *_force(plan)]
            for s in text_shards(plan)]


def checkpoint_every(steps: int) -> int:
    """A quarter of the run, at least 100 steps and at most 500. A checkpoint (weights and AdamW moments,
    written and fsynced: 202 MB and 2.7 s wall, 2.2 CPU s, for the demo's 3-layer student) every 100
    steps of 1.4 s is 2% of the run; every quarter of a warm month's 60 steps it was 13%, to save at most
    80 s of work if the run is killed. Runs shorter than 100 steps are rerun whole after a kill."""
    return min(500, max(100, steps // 4))


def distill_args(plan: Plan, teacher: str) -> list[list[str]]:
    """The student, and (unless the form turned it off) its no-teacher control: the same student, init
    (the champion too, when warm-started), data and steps on the hard labels only, so evaluate can
    say what the teacher added."""
    p = plan.params
    steps = train_steps(plan)
    warm = ["--init-from", plan.init_from, "--learning-rate", str(p.warm_start_learning_rate)] if plan.init_from else []
    if fresh_share(plan):
        warm += ["--fresh", join_uri(labels_folder(plan, teacher), "fresh"), "--fresh-share", str(fresh_share(plan))]
    common = ["distill", "--teacher", teacher, "--labels", labels_folder(plan, teacher),
              "--student-layers", str(p.student_layers), "--top-k", str(p.top_k), "--steps",
              str(steps), "--batch-size", str(p.batch_size), "--grad-accum", str(p.ranks),
              "--checkpoint-every", str(checkpoint_every(steps)), *warm, *_force(plan)]
    runs = [[*common, "--output", plan.student]]
    if p.control:
        runs.append([*common, "--output", control_folder(plan), "--soft-mlm-weight", "0", "--soft-nsp-weight", "0"])
    return runs


def evaluate_args(plan: Plan, teacher: str) -> list[str]:
    control = ["--control", control_folder(plan)] if plan.params.control else []
    temporal = ["--temporal", join_uri(labels_folder(plan, teacher), "temporal")] if plan.previous else []
    return ["evaluate", "--teacher", teacher, "--student", plan.student, "--heldout",
            join_uri(labels_folder(plan, teacher), "heldout"), "--output", plan.report,
            "--top-k", str(plan.params.top_k), "--champion", plan.model_name, *control, *temporal, *_force(plan)]


def publish_args(plan: Plan) -> list[str]:
    return ["publish", "--student", plan.student, "--report", plan.report, "--model-name", plan.model_name,
            *_force(plan)]


def _force(plan: Plan) -> list[str]:
    return ["--force"] if plan.params.force else []
