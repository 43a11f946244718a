"""The run plan: from the form's params to every step's URIs and sizes (the command lines: step_args.py).

Pure functions of (params, settings, the dump date), so the same plan comes out of the DAG,
a test or a rerun, and a rerun finds the outputs of the first (resume = the steps' own
manifests). The plan is a frozen dataclass; it travels between tasks as its JSON form
(`to_xcom`, `from_xcom`: Airflow deserialises only its own classes from XCom).

The layout is DESIGN.md's, with two differences. Every folder below the articles is keyed
by everything that shapes it: text by the dump files and shard counts (`text/<corpus key>`),
examples, the adapted teacher and labels also by sequence length, masked positions and dupe
factor, so a trial on part of a dump or with other settings never shares a folder with the
full run (and never leaves shards a later run would read). And a student's folder is keyed
by a hash of the settings that shape it rather than by an MLflow run id, so a retriggered
run finds the half-trained student of the killed one and resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from bertdistill.flags import default
from bertdistill.manifest import FOLDER_MANIFEST
from bertdistill.orchestration.settings import Settings
from bertdistill.steps.adapt_teacher import AdaptTeacherParams
from bertdistill.steps.build_corpus import BuildCorpusParams
from bertdistill.steps.distill import DistillParams
from bertdistill.steps.fetch_dump import FetchDumpParams
from bertdistill.steps.make_examples import MakeExamplesParams


@dataclass(frozen=True)
class RunParams:
    """The form's fields and the defaults a monthly run uses (make demo passes smaller ones).

    A field that is a step's setting takes the step's own default (flags.default), so the form and
    `bertdistill <step> --help` cannot disagree. Three differ on purpose: train_steps (10,000, a
    real student; distill's 300 is a quick trial from the command line), wiki (the form offers a
    choice; fetch-dump has none) and what only the DAG knows (the teacher, ranks, control, force).
    """

    wiki: str = "enwiki"
    date: str = default(FetchDumpParams, "date")
    max_dump_files: int | None = default(FetchDumpParams, "max_files")
    teacher: str | None = None  # None: the deployment's (BERTDISTILL_TEACHER)
    train_shards: int = default(BuildCorpusParams, "train_shards")
    heldout_shards: int = default(BuildCorpusParams, "heldout_shards")
    max_seq_length: int = default(MakeExamplesParams, "max_seq_length")
    max_predictions_per_seq: int = default(MakeExamplesParams, "max_predictions_per_seq")
    dupe_factor: int = default(MakeExamplesParams, "dupe_factor")
    adapt_steps: int = default(AdaptTeacherParams, "steps")
    adapt_learning_rate: float = default(AdaptTeacherParams, "learning_rate")
    student_layers: int = default(DistillParams, "student_layers")
    top_k: int = default(DistillParams, "top_k")
    train_steps: int = 10_000
    batch_size: int = default(DistillParams, "batch_size")
    ranks: int = 1
    control: bool = True
    warm_start: bool = False
    warm_start_fraction: float = 0.3
    fresh_share: float = 0.5
    warm_start_learning_rate: float = 1e-4
    force: bool = False
    size: str = "full"


DEFAULTS: dict[str, Any] = dataclasses.asdict(RunParams())

# `size: demo`: what `make demo` runs, about 15 minutes on 2 CPU cores with MiniLM (one dump file,
# 4 + 1 shards of 64-token examples, a 300-step head fit, 200 training steps of a 3-layer student
# and its control). The form offers it, and `make up` gives it to the monthly DAG, so a first
# try on a laptop costs minutes, not the hours of the full defaults.
DEMO: dict[str, Any] = {"max_dump_files": 1, "train_shards": 4, "heldout_shards": 1, "max_seq_length": 64,
                        "max_predictions_per_seq": 10, "dupe_factor": 1, "adapt_steps": 300,
                        "adapt_learning_rate": 0.001, "train_steps": 200}
SIZES: dict[str, dict[str, Any]] = {"full": {}, "demo": DEMO}


def sized_values(params: dict[str, Any]) -> dict[str, Any]:
    """The form's values with its size applied: a preset fills every size field left at its default
    (the form always sends every field), so a field the person changed keeps that change."""
    values = {k: v for k, v in params.items() if v is not None}
    size = values.get("size", DEFAULTS["size"])
    if size not in SIZES:
        raise ValueError(f"size = {size!r}: use one of {', '.join(SIZES)}")
    return values | {k: v for k, v in SIZES[size].items() if values.get(k, DEFAULTS[k]) == DEFAULTS[k]}


@dataclass(frozen=True)
class Plan:
    """Everything later tasks need: the params as they will run, the dump date, every URI."""

    params: RunParams
    date: str
    run: str
    dumps: str
    dump_folder: str
    articles: str
    text: str
    examples: str
    teacher_source: str
    model_name: str
    teacher: str
    adapted_teacher: str
    student: str
    report: str
    published: str
    init_from: str | None = None  # warm start: the champion's student folder
    previous: str | None = None  # the last month's dump date: what is new or changed is judged against it

    def to_xcom(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_xcom(cls, value: dict[str, Any]) -> Plan:
        return cls(**value | {"params": RunParams(**value["params"])})


MAX_MAP_LENGTH = 1024  # Airflow's [core] max_map_length default: most tasks one mapped task may expand to


def full_params(params: dict[str, Any], max_map_length: int = MAX_MAP_LENGTH) -> RunParams:
    """The form's values over the defaults, refused when they cannot run (before any step starts)."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown params {', '.join(unknown)}; the form has {', '.join(DEFAULTS)}")
    p = RunParams(**sized_values(params))
    shards = p.train_shards + p.heldout_shards
    if shards > max_map_length:
        raise ValueError(f"train_shards + heldout_shards = {shards}: make_examples and label_teacher would each "
                         f"expand to {shards} tasks, over Airflow's max_map_length of {max_map_length}; use fewer "
                         "shards (or raise [core] max_map_length)")
    if p.ranks > p.train_shards:
        raise ValueError(f"ranks = {p.ranks} but train_shards = {p.train_shards}: every Horovod rank reads "
                         "its own train shards, so use at most as many ranks as train shards")
    if not 0 < p.warm_start_fraction <= 1:
        raise ValueError(f"warm_start_fraction = {p.warm_start_fraction}: a warm start trains this fraction of "
                         "train_steps, so give a number above 0 and at most 1")
    if not p.warm_start_learning_rate > 0:
        raise ValueError(f"warm_start_learning_rate = {p.warm_start_learning_rate}: give a peak learning rate above 0 "
                         "for a warm-started student")
    if not 0 <= p.fresh_share < 1:
        raise ValueError(f"fresh_share = {p.fresh_share}: the share of a warm start's examples drawn from the new "
                         "and changed articles is at least 0 and below 1 (the rest replays the whole month)")
    return p


# Example bytes per compressed dump byte per dupe pass: text/bz2 1.54 and examples/text 1.86 on the
# sample (64 tokens); make-examples' own estimate is 2 per dupe pass. Rounded up: shards come out
# at or under the target, never over.
EXAMPLE_BYTES_PER_DUMP_BYTE = 3.0


def sized(p: RunParams, dump_bytes: int | None, shard_target_mb: int) -> RunParams:
    """More train shards than the form asked for when the dump would make shards bigger than the
    target: a shard's examples pass through its make-examples pod's scratch (the whole-shard
    shuffle), so the target bounds that scratch whatever the dump's size."""
    if not dump_bytes:
        return p
    examples = dump_bytes * EXAMPLE_BYTES_PER_DUMP_BYTE * p.dupe_factor
    needed = -(-int(examples) // (shard_target_mb << 20)) - p.heldout_shards
    return dataclasses.replace(p, train_shards=max(p.train_shards, needed))


def corpus_key(p: RunParams) -> str:
    """What shapes the text shards: which dump files, and how many train and held-out shards."""
    files = f"first{p.max_dump_files}" if p.max_dump_files else "all"
    return f"{files}-{p.train_shards}-{p.heldout_shards}"


def examples_key(p: RunParams) -> str:
    """What shapes the examples made from those shards, below the corpus key."""
    return f"{corpus_key(p)}/{p.max_seq_length}-{p.max_predictions_per_seq}-{p.dupe_factor}"


def month_run(plan: Plan, date: str) -> str:
    """The run folder of another month of the same wiki: its folders below have the same keys."""
    return join_uri(plan.run.rsplit("/", 1)[0], f"{plan.params.wiki}-{date}")


def in_month(plan: Plan, uri: str, date: str) -> str:
    """This month's folder `uri`, the same folder in another month's run."""
    return month_run(plan, date) + uri.removeprefix(plan.run)


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _last(uri: str) -> str:
    """A URI's last part: the name of the folder (or zip) it points at."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _key(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def make_plan(params: dict[str, Any], settings: Settings, date: str, dump_bytes: int | None = None,
              max_map_length: int = MAX_MAP_LENGTH, champion: str | None = None, previous: str | None = None) -> Plan:
    """Everything later tasks need: URIs and keys, from which each step's arguments follow.

    `dump_bytes` (the selected files' compressed size, from dumpstatus.json) raises the train
    shard count to keep each shard under the deployment's target size (`sized`). `champion` (the
    current champion's student folder) is where a warm start begins; without one a warm start
    starts cold. `previous` (the date of last month, whose text has these settings) adds the
    temporal held-out split: articles new or changed since then."""
    p = full_params(params, max_map_length)
    wanted = sized(p, dump_bytes, int(settings.shard_target_mb))
    if wanted.train_shards != p.train_shards:
        try:
            # the sizes are final here: checked again, with no preset to apply twice
            p = dataclasses.replace(full_params(dataclasses.asdict(wanted) | {"size": "full"}, max_map_length),
                                    size=p.size)
        except ValueError as exc:
            raise ValueError(f"{exc} (a dump of {dump_bytes / 1e9:.1f} GB needs {wanted.train_shards} train "
                             f"shards to stay under {settings.shard_target_mb} MB of examples per shard: raise "
                             "BERTDISTILL_SHARD_TARGET_MB, or give the pods more scratch)") from None
    root = settings.store_root()
    run = join_uri(root, "runs", f"{p.wiki}-{date}")
    teacher_source = p.teacher or settings.teacher
    teacher_name = _last(teacher_source).removesuffix(".zip")
    examples = join_uri(run, "examples", examples_key(p))
    teacher = join_uri(root, "teachers", teacher_name)
    adapted = join_uri(run, "teachers", examples_key(p),
                    f"{teacher_name}-adapted-{p.adapt_steps}-lr{p.adapt_learning_rate:g}")
    init_from = champion if p.warm_start else None
    warm = {"init_from": init_from, "warm_start_fraction": p.warm_start_fraction,
            "warm_start_learning_rate": p.warm_start_learning_rate} if init_from else {}
    if init_from and previous:
        warm["fresh_share"] = p.fresh_share
    student_key = _key({k: getattr(p, k) for k in ("student_layers", "top_k", "train_steps", "batch_size", "ranks")}
                       | {"teacher": teacher_source, "examples": examples, "adapted": adapted} | warm)
    student = join_uri(run, "students", f"{p.student_layers}l-k{p.top_k}-{student_key}")
    # one registered model per kind of student: only like students (same wiki, teacher, shape and
    # sequence length) compete for its champion alias
    model_name = f"bertdistill-{p.wiki}-{teacher_name}-{p.student_layers}l-{p.max_seq_length}"
    return Plan(params=p, date=date, run=run, dumps=join_uri(root, "dumps"),
                dump_folder=join_uri(root, "dumps", p.wiki, date), articles=join_uri(run, "articles"),
                text=join_uri(run, "text", corpus_key(p)), examples=examples,
                teacher_source=teacher_source, model_name=model_name, teacher=teacher, adapted_teacher=adapted,
                student=student, report=join_uri(student, "report"),
                published=join_uri(student, "published", FOLDER_MANIFEST), init_from=init_from, previous=previous)


def train_labels_per_shard(plan: Plan) -> int:
    """How many examples of each train shard distill will read: its steps (fewer when warm-started)
    x global batch over the shards of one Horovod group (ranks groups split the shards; the smallest
    group has train_shards // ranks of them), less the share a warm start draws from the fresh
    shard (the expected count: a few draws more re-read the shard's first examples). Labelling more
    would be teacher time nobody trains on."""
    p = plan.params
    replay = 1 - fresh_share(plan)
    return math.ceil(train_steps(plan) * p.batch_size * replay / (p.train_shards // p.ranks))


def fresh_share(plan: Plan) -> float:
    """The share of each batch drawn from the month's new and changed articles: a warm start's, when
    there is a month before to compare with; otherwise none (a cold student trains on the whole month)."""
    return plan.params.fresh_share if plan.init_from and plan.previous else 0.0


def labels_folder(plan: Plan, teacher: str) -> str:
    p = plan.params
    return join_uri(plan.run, "labels", examples_key(p),
                 f"{_last(teacher)}-k{p.top_k}-n{train_labels_per_shard(plan)}")


def articles_folder(plan: Plan, dump_file: str) -> str:
    return join_uri(plan.articles, dump_file.split(".xml")[0])


TEMPORAL_SHARD = "temporal/shard-00000"  # build-corpus' one temporal held-out shard


FRESH_SHARD = "fresh/shard-00000"  # the new and changed articles that train: a warm start's diff


def text_shards(plan: Plan) -> list[str]:
    """Shard names ('train/shard-00000') made into examples and labelled: those of the build-corpus
    settings; a month with a month before it adds the temporal held-out shard (its new and changed
    articles that stay out of training) and, for a warm start that draws from it, the fresh shard."""
    p = plan.params
    return ([f"train/shard-{i:05d}" for i in range(p.train_shards)]
            + [f"heldout/shard-{i:05d}" for i in range(p.heldout_shards)]
            + ([TEMPORAL_SHARD] if plan.previous else [])
            + ([FRESH_SHARD] if fresh_share(plan) else []))


def control_folder(plan: Plan) -> str:
    """The no-teacher control lives inside its student's folder: same settings, same key."""
    return join_uri(plan.student, "control")


def train_steps(plan: Plan) -> int:
    """The student's steps: train_steps, or the warm-start fraction of them when it starts from the champion."""
    p = plan.params
    return max(1, math.ceil(p.train_steps * p.warm_start_fraction)) if plan.init_from else p.train_steps
