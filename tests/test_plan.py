"""The run plan and the dump it resolves: pure functions, tested in-process on handwritten inputs."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bertdistill.errors import StepError
from bertdistill.orchestration import plan as planning
from bertdistill.orchestration import step_args
from bertdistill.orchestration.settings import Settings
from bertdistill.steps.fetch_dump import Mirror, resolve_date

SETTINGS = Settings(store="s3://bucket/bd", teacher="s3://bucket/src/minilm")
FULL = {"train_shards": 8, "heldout_shards": 1}
TRIAL = {"max_dump_files": 1, "train_shards": 2, "heldout_shards": 1}
FOLDERS = ("text", "examples", "adapted_teacher", "student")


def test_a_trial_on_part_of_a_dump_shares_no_folder_with_the_full_run():
    full = planning.make_plan(FULL, SETTINGS, "20261101")
    trial = planning.make_plan(TRIAL, SETTINGS, "20261101")
    for key in FOLDERS:
        assert getattr(full, key) != getattr(trial, key), key
        mine, theirs = getattr(full, key), getattr(trial, key)
        assert not mine.startswith(theirs + "/") and not theirs.startswith(mine + "/"), key
    assert planning.labels_folder(full, full.teacher) != planning.labels_folder(trial, trial.teacher)
    assert full.published != trial.published  # the trial's publish never marks the full run done
    assert full.model_name == trial.model_name  # the same kind of student: they compete for the champion
    assert full.text.endswith("/text/all-8-1") and trial.text.endswith("/text/first1-2-1")


@pytest.mark.parametrize("change", [{"max_seq_length": 64}, {"max_predictions_per_seq": 10}, {"dupe_factor": 2}])
def test_every_example_setting_keys_the_examples_labels_and_student(change):
    base = planning.make_plan(FULL, SETTINGS, "20261101")
    other = planning.make_plan(FULL | change, SETTINGS, "20261101")
    assert base.text == other.text  # the text shards do not depend on it
    for key in ("examples", "adapted_teacher", "student"):
        assert getattr(base, key) != getattr(other, key), key
    assert planning.labels_folder(base, base.teacher) != planning.labels_folder(other, other.teacher)


def test_build_corpus_reads_only_the_articles_of_the_selected_dump_files():
    plan = planning.make_plan(TRIAL, SETTINGS, "20261101")
    args = step_args.build_corpus_args(plan, ["enwiki-20261101-pages-articles1.xml-p1p41242.bz2"])
    inputs = args[args.index("--input") + 1: args.index("--output")]
    assert inputs == [f"{plan.articles}/enwiki-20261101-pages-articles1"]
    [extract] = step_args.extract_args(plan, ["enwiki-20261101-pages-articles1.xml-p1p41242.bz2"])
    assert extract[extract.index("--output") + 1] == inputs[0]  # what extract wrote, and only that


def test_shard_counts_over_the_mapped_task_limit_are_refused_before_any_task():
    with pytest.raises(ValueError, match=r"= 1025: .* 1025 tasks, over Airflow's max_map_length of 1024") as exc:
        planning.full_params({"train_shards": 1000, "heldout_shards": 25})
    assert "train_shards + heldout_shards" in str(exc.value)
    assert planning.full_params({"train_shards": 1000, "heldout_shards": 24}).train_shards == 1000
    with pytest.raises(ValueError, match="max_map_length of 8"):
        planning.full_params({"train_shards": 8, "heldout_shards": 1}, max_map_length=8)


def test_more_ranks_than_train_shards_are_refused():
    with pytest.raises(ValueError, match=r"ranks = 4 but train_shards = 2: .* at most as many ranks"):
        planning.full_params({"train_shards": 2, "ranks": 4})
    assert planning.full_params({"train_shards": 4, "ranks": 4}).ranks == 4


def _dump(root, date: str, status: str, updated: str | None) -> None:
    folder = root / "enwiki" / date
    folder.mkdir(parents=True)
    job = {"status": status, "files": {f"enwiki-{date}-pages-articles.xml.bz2": {}}}
    if updated:
        job["updated"] = updated
    (folder / "dumpstatus.json").write_text(json.dumps({"jobs": {"articlesdump": job}}))


def test_latest_is_the_newest_dump_finished_at_the_runs_own_time(tmp_path):
    """A run on 2 Nov (before the November dump finished) and the same run cleared on 20 Nov
    both distill October's; a run on 20 Nov distills November's."""
    _dump(tmp_path, "20261001", "done", "2026-10-04 10:00:00")
    _dump(tmp_path, "20261101", "done", "2026-11-04 09:30:00")
    _dump(tmp_path, "20261120", "in-progress", None)
    mirror = Mirror(str(tmp_path))
    assert resolve_date(mirror, "enwiki", "latest", datetime(2026, 11, 2, 3, tzinfo=UTC))[0] == "20261001"
    assert resolve_date(mirror, "enwiki", "latest", datetime(2026, 11, 4, 9, 29, tzinfo=UTC))[0] == "20261001"
    assert resolve_date(mirror, "enwiki", "latest", datetime(2026, 11, 4, 9, 30, tzinfo=UTC))[0] == "20261101"
    assert resolve_date(mirror, "enwiki", "latest", datetime(2026, 11, 20, 3))[0] == "20261101"  # naive = UTC
    assert resolve_date(mirror, "enwiki", "latest")[0] == "20261101"  # no time: the newest finished now
    assert resolve_date(mirror, "enwiki", "20261001", datetime(2026, 9, 1, tzinfo=UTC))[0] == "20261001"  # named


def test_the_teacher_labels_what_distill_and_evaluate_read_and_no_more():
    p = {"train_shards": 8, "heldout_shards": 1, "train_steps": 1000, "batch_size": 32, "ranks": 3}
    plan = planning.make_plan(p, SETTINGS, "20261101")
    args = step_args.label_teacher_args(plan, plan.teacher)
    caps = {a[a.index("--input") + 1].rsplit("/", 2)[-2]: int(a[a.index("--max-examples") + 1]) for a in args}
    # 3 ranks split 8 shards 3/3/2: the 2-shard group reads 1000 x 32 / 2 = 16,000 examples of each
    assert caps == {"train": 16_000, "heldout": 50_000}
    assert planning.labels_folder(plan, plan.teacher).endswith("/minilm-k10-n16000")
    more = planning.make_plan(p | {"train_steps": 2000}, SETTINGS, "20261101")
    assert planning.labels_folder(more, more.teacher) != planning.labels_folder(plan, plan.teacher)
    assert planning.make_plan(p | {"ranks": 2}, SETTINGS, "20261101").student != plan.student


def test_a_bigger_dump_gets_more_shards_so_each_fits_the_target():
    small = planning.make_plan(FULL, SETTINGS, "20261101", dump_bytes=2_000_000)
    assert small.params.train_shards == 8  # the form's count: shards well under 2 GB
    enwiki = planning.make_plan(FULL, SETTINGS, "20261101", dump_bytes=22 * 10**9)  # dupe 10
    shards = enwiki.params.train_shards + enwiki.params.heldout_shards
    assert 22e9 * planning.EXAMPLE_BYTES_PER_DUMP_BYTE * 10 / shards <= 2048 << 20
    assert enwiki.text.endswith(f"/text/all-{enwiki.params.train_shards}-1")
    with pytest.raises(ValueError, match=r"needs .* train shards to stay under 2048 MB"):
        planning.make_plan(FULL, SETTINGS, "20261101", dump_bytes=22 * 10**9, max_map_length=100)
    tight = Settings(store="s3://bucket/bd", shard_target_mb="1024")
    assert planning.make_plan(FULL, tight, "20261101", dump_bytes=22 * 10**9).params.train_shards > shards


def test_a_gpu_step_may_wait_hours_to_be_scheduled_and_minutes_to_start():
    from bertdistill.orchestration.runners import pod_kwargs

    settings = Settings(mode="kubernetes")
    gpu, cpu = pod_kwargs(settings, "label_teacher", {}), pod_kwargs(settings, "make_examples", {})
    assert gpu["schedule_timeout_seconds"] == 6 * 3600 and cpu["schedule_timeout_seconds"] == 3600
    assert gpu["startup_timeout_seconds"] == cpu["startup_timeout_seconds"] == 600


def test_check_dump_plans_the_newest_dump_and_stops_when_it_was_published(sample, tmp_path):
    """The daily check: a plan for the sample's dump; once that dump's student is published (its
    published manifest), nothing to do; more ranks than shards refused before any step."""
    from bertdistill.orchestration import tasks

    settings = Settings(store=str(tmp_path / "store"), mirror=str(sample / "mirror"), teacher=str(sample / "minilm"))
    params = {"max_dump_files": 1, "train_shards": 2, "heldout_shards": 1}
    plan, nothing_to_do = tasks.check_dump(params, settings, as_of=datetime(2026, 11, 26, 3, tzinfo=UTC))
    assert plan.date == "20160101" and plan.text.endswith("/text/first1-2-1") and nothing_to_do is None
    published = Path(plan.published)
    published.parent.mkdir(parents=True)
    published.write_text('{"step": "publish", "params": {}, "inputs": {}, "summary": {"model_version": 3}}')
    _, nothing_to_do = tasks.check_dump(params, settings, as_of=datetime(2026, 11, 27, 3, tzinfo=UTC))
    # what the run's note in Airflow's grid says: the dump, the model it produced, how to redo it
    assert nothing_to_do == (f"enwiki 20160101 was already distilled and published with these settings, as "
                             f"{plan.model_name} version 3; set force to distil it again")
    plan, nothing_to_do = tasks.check_dump(params | {"force": True}, settings)
    assert plan.date == "20160101" and nothing_to_do is None
    with pytest.raises(ValueError, match="at most as many ranks"):
        tasks.check_dump(params | {"ranks": 3}, settings)
    with pytest.raises(StepError, match=r"no dump dates listed .* on or before 2015-06-01"):
        tasks.check_dump(params, settings, as_of=datetime(2015, 6, 1, tzinfo=UTC))


def _commit(folder: str, **manifest) -> None:
    """A manifest as a step commits it: what the DAG's tasks read, and all they read."""
    from bertdistill.manifest import FOLDER_MANIFEST, Manifest

    path = Path(folder) / FOLDER_MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(Manifest(**{"step": "test", "params": {}, "inputs": {}} | manifest).to_bytes())


def test_the_plan_travels_as_json_and_comes_back_equal():
    plan = planning.make_plan(TRIAL | {"teacher": "gs://b/bert.zip"}, SETTINGS, "20261101")
    value = json.loads(json.dumps(plan.to_xcom()))
    assert planning.Plan.from_xcom(value) == plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.student = "elsewhere"


def test_extract_and_build_corpus_take_the_files_fetch_dump_committed(tmp_path):
    from bertdistill.orchestration import tasks

    plan = planning.make_plan(TRIAL, Settings(store=str(tmp_path)), "20261101")
    with pytest.raises(RuntimeError, match="has no manifest: fetch_dump did not finish"):
        tasks.dump_files(plan.to_xcom())
    names = ["enwiki-20261101-pages-articles2.xml-p2p3.bz2", "enwiki-20261101-pages-articles1.xml-p1p1.bz2"]
    _commit(plan.dump_folder, outputs={n: {} for n in [*names, "enwiki-20261101-sha1sums.txt"]})
    extracts = tasks.dump_files(plan.to_xcom())
    assert [a[a.index("--input") + 1].rsplit("/", 1)[1] for a in extracts] == sorted(names)
    corpus = tasks.corpus(plan)
    assert corpus[corpus.index("--input") + 1: corpus.index("--output")] == [
        a[a.index("--output") + 1] for a in extracts]


def test_a_month_after_another_extracts_copying_from_the_articles_its_text_was_built_from(tmp_path):
    """Every extract of the month gets all the articles folders the previous month's text names (a page
    may move between a dump's files), the same ones build-corpus compares against; `force` none."""
    from bertdistill.orchestration import tasks

    settings = Settings(store=str(tmp_path))
    last = planning.make_plan(TRIAL, settings, "20261001")
    old = [planning.articles_folder(last, f"enwiki-20261001-pages-articles{i}.xml-p{i}p{i}.bz2") for i in (1, 2)]
    _commit(last.text, inputs={"articles[0]": f"{old[0]} sha-a", "articles[1]": f"{old[1]} sha-b"})
    names = [f"enwiki-20261101-pages-articles{i}.xml-p{i}p{i}.bz2" for i in (1, 2)]
    for params in (TRIAL, TRIAL | {"force": True}):
        plan = planning.make_plan(params, settings, "20261101", previous="20261001")
        _commit(plan.dump_folder, outputs={n: {} for n in names})
        extracts = tasks.dump_files(plan.to_xcom())
        corpus = tasks.corpus(plan)
        assert len(extracts) == 2 and corpus[corpus.index("--previous") + 1:][:2] == old
        for extract in extracts:
            if params.get("force"):
                assert "--reuse" not in extract and "--force" in extract
            else:
                assert extract[extract.index("--reuse") + 1:] == old
    _commit(last.dump_folder, outputs={names[0].replace("20261101", "20261001"): {}})
    [first_month] = tasks.dump_files(last.to_xcom())
    assert "--reuse" not in first_month


def test_the_teacher_is_adapted_only_without_a_head_and_used_once_adapted(tmp_path):
    from bertdistill.orchestration import tasks

    plan = planning.make_plan(TRIAL, Settings(store=str(tmp_path), teacher="/src/minilm"), "20261101")
    with pytest.raises(RuntimeError, match="fetch_teacher did not finish"):
        tasks.teacher_needs_head(plan)
    _commit(plan.teacher, summary={"heads": ["pooler"]})
    assert tasks.teacher_needs_head(plan) is True
    assert tasks.teacher_ready(plan)["teacher"] == plan.teacher
    _commit(plan.adapted_teacher, summary={"heads": ["mlm", "nsp", "pooler"]})
    ready = tasks.teacher_ready(plan.to_xcom())
    assert ready["teacher"] == plan.adapted_teacher
    assert ready["evaluate"][ready["evaluate"].index("--teacher") + 1] == plan.adapted_teacher
    assert all(a[a.index("--teacher") + 1] == plan.adapted_teacher for a in tasks.trainings(plan, ready["teacher"]))
    _commit(plan.teacher, summary={"heads": ["mlm", "nsp"]})
    assert tasks.teacher_needs_head(plan) is False


def test_the_demo_size_fills_the_fields_left_at_their_defaults_and_keeps_the_changed_ones():
    """`size: demo` is make demo's sizes; the form sends every field, so a field still at its full
    default takes the preset and one the person changed keeps the change."""
    demo = planning.full_params({"size": "demo"})
    assert {k: getattr(demo, k) for k in planning.DEMO} == planning.DEMO
    assert demo.size == "demo" and demo.student_layers == planning.DEFAULTS["student_layers"]
    changed = planning.full_params(planning.DEFAULTS | {"size": "demo", "train_steps": 50})
    assert changed.train_steps == 50 and changed.train_shards == planning.DEMO["train_shards"]
    assert planning.full_params(planning.DEFAULTS) == planning.RunParams()  # full: every field as it is
    with pytest.raises(ValueError, match="size = 'huge': use one of full, demo"):
        planning.full_params({"size": "huge"})


def test_a_demo_sized_plan_keeps_its_sizes_when_the_dump_needs_more_shards():
    """make_plan checks the sizes again after raising the shard count: the preset is not applied twice."""
    settings = Settings(store="/store", shard_target_mb="1")
    plan = planning.make_plan({"size": "demo"}, settings, "20160101", dump_bytes=3_000_000)
    assert plan.params.size == "demo" and plan.params.train_steps == planning.DEMO["train_steps"]
    assert plan.params.train_shards > planning.DEMO["train_shards"]


def test_a_warm_start_begins_at_the_champion_and_trains_its_fraction_of_the_steps():
    """Student and control both start from the champion and train 30% of the steps, in a student folder
    of their own; with no champion yet the run starts cold; a fraction outside (0, 1] is refused."""
    champion = "s3://bucket/bd/runs/enwiki-20261001/students/3l-k10-abc"
    cold = planning.make_plan(FULL, SETTINGS, "20261101")
    warm = planning.make_plan(FULL | {"warm_start": True}, SETTINGS, "20261101", champion=champion)
    assert warm.init_from == champion and warm.student != cold.student
    runs = step_args.distill_args(warm, warm.adapted_teacher)
    assert len(runs) == 2
    for args in runs:
        assert args[args.index("--init-from") + 1] == champion
        assert args[args.index("--steps") + 1] == "3000"  # 30% of 10,000
        assert args[args.index("--learning-rate") + 1] == "0.0001"  # the warm start's peak, below a cold one's
    assert not {"--init-from", "--learning-rate"} & set(step_args.distill_args(cold, cold.adapted_teacher)[0])
    first_month = planning.make_plan(FULL | {"warm_start": True}, SETTINGS, "20261101", champion=None)
    assert first_month.init_from is None and first_month.student == cold.student
    assert planning.make_plan(FULL, SETTINGS, "20261101", champion=champion).init_from is None  # not asked for
    assert planning.Plan.from_xcom(warm.to_xcom()) == warm
    with pytest.raises(ValueError, match="warm_start_fraction = 0"):
        planning.full_params(FULL | {"warm_start": True, "warm_start_fraction": 0})
    with pytest.raises(ValueError, match="warm_start_learning_rate = 0"):
        planning.full_params(FULL | {"warm_start_learning_rate": 0})
    hotter = planning.make_plan(FULL | {"warm_start": True, "warm_start_learning_rate": 5e-4}, SETTINGS, "20261101",
                                champion=champion)
    assert hotter.student != warm.student  # another student, in a folder of its own
    # what a warm student reads is all that is labelled: 30% of the steps, 30% of the labels
    assert planning.train_labels_per_shard(warm) * 10 == planning.train_labels_per_shard(cold) * 3


def test_month_two_finds_month_one_and_reuses_its_adapted_teacher_while_the_teacher_is_the_same(tmp_path):
    """The previous month is the newest earlier dump in the store whose text has these settings: it adds
    the temporal shard (made, labelled like the held-out split, scored by evaluate). Its adapted teacher
    labels month two unless the fetched teacher changed since, or force asks for everything again."""
    from bertdistill.orchestration import tasks

    settings = Settings(store=str(tmp_path), teacher="/src/minilm")
    one = planning.make_plan(TRIAL, settings, "20261001")
    two = planning.make_plan(TRIAL, settings, "20261101")
    assert tasks.previous_month(two) is None
    _commit(one.dump_folder, outputs={"enwiki-20261001-pages-articles1.xml-p1p1.bz2": {}})
    _commit(two.dump_folder, outputs={"enwiki-20261101-pages-articles1.xml-p1p1.bz2": {}})
    assert tasks.previous_month(two) is None  # fetched, but no text with these settings
    _commit(one.text, inputs={"articles": f"{one.articles}/enwiki-20261001-pages-articles1 manifest:ab"})
    assert tasks.previous_month(two) == "20261001" and tasks.previous_month(one) is None
    two = planning.make_plan(TRIAL, settings, "20261101", previous="20261001")
    assert planning.text_shards(two)[-1] == planning.TEMPORAL_SHARD
    assert planning.TEMPORAL_SHARD not in planning.text_shards(one)
    corpus = tasks.corpus(two)
    assert corpus[corpus.index("--previous") + 1:corpus.index("--previous") + 2] == [
        f"{one.articles}/enwiki-20261001-pages-articles1"]
    labels = step_args.label_teacher_args(two, two.adapted_teacher)[-1]
    assert labels[labels.index("--input") + 1].endswith("temporal/shard-00000.tfrecord")
    assert labels[labels.index("--max-examples") + 1] == "50000"  # as many as evaluate reads
    for args in step_args.label_teacher_args(two, two.adapted_teacher):  # labels of unchanged examples copied
        assert args[args.index("--reuse") + 1] == f"{one.run}/labels/{planning.examples_key(one.params)}"
    assert "--reuse" not in step_args.label_teacher_args(one, one.adapted_teacher)[0]
    assert planning.FRESH_SHARD not in planning.text_shards(two)  # a cold student reads the whole month only
    evaluate = step_args.evaluate_args(two, two.adapted_teacher)
    assert evaluate[evaluate.index("--temporal") + 1].endswith("/temporal")
    assert "--temporal" not in step_args.evaluate_args(one, one.adapted_teacher)

    _commit(two.teacher, summary={"heads": ["pooler"]})
    assert tasks.teacher_needs_head(two) is True  # month one adapted nothing yet
    from bertdistill.manifest import input_fingerprint

    _commit(one.adapted_teacher, inputs={"teacher": f"{one.teacher} {input_fingerprint(one.teacher)}"})
    assert one.adapted_teacher.startswith(f"{one.run}/") and tasks.teacher_needs_head(two) is False
    assert tasks.teacher_ready(two)["teacher"] == one.adapted_teacher
    forced = planning.make_plan(TRIAL | {"force": True}, settings, "20261101", previous="20261001")
    assert tasks.teacher_needs_head(forced) is True and tasks.teacher_ready(forced)["teacher"] == forced.teacher
    assert "--reuse" not in step_args.label_teacher_args(forced, forced.teacher)[0]  # force labels everything
    _commit(two.teacher, summary={"heads": ["pooler"], "refetched": True})  # another teacher under the same name
    assert tasks.teacher_needs_head(two) is True and tasks.teacher_ready(two)["teacher"] == two.teacher


def test_a_warm_month_two_draws_its_fresh_share_from_the_new_and_changed_articles():
    """Warm with a month before: the fresh shard is made and labelled (as many examples as a group draws),
    distill mixes it in at fresh_share, and the train shards are labelled for the rest of the draws only.
    Warm without a month before, or with fresh_share 0, reads the train shards alone."""
    champion = "s3://bucket/bd/runs/enwiki-20261001/students/3l-k10-abc"
    warm = planning.make_plan(FULL | {"warm_start": True}, SETTINGS, "20261101", champion=champion,
                              previous="20261001")
    assert planning.text_shards(warm)[-2:] == [planning.TEMPORAL_SHARD, planning.FRESH_SHARD]
    labels = step_args.label_teacher_args(warm, warm.adapted_teacher)[-1]
    assert labels[labels.index("--input") + 1].endswith("fresh/shard-00000.tfrecord")
    assert labels[labels.index("--max-examples") + 1] == str(3000 * 32 // 2)  # half of 3,000 steps x 32
    replays = {args[args.index("--input") + 1].rsplit("/", 2)[-2]: "--replay" in args
               for args in step_args.label_teacher_args(warm, warm.adapted_teacher)}
    assert replays == {"train": True, "heldout": False, "temporal": False, "fresh": False}  # unchanged replayed
    forced = planning.make_plan(FULL | {"warm_start": True, "force": True}, SETTINGS, "20261101", champion=champion,
                                previous="20261001")
    assert not any("--replay" in args for args in step_args.label_teacher_args(forced, forced.adapted_teacher))
    for args in step_args.distill_args(warm, warm.adapted_teacher):  # the student and its control alike
        assert args[args.index("--fresh") + 1].endswith("/fresh") and args[args.index("--fresh-share") + 1] == "0.5"
    unmixed = planning.make_plan(FULL | {"warm_start": True}, SETTINGS, "20261101", champion=champion)
    assert planning.train_labels_per_shard(warm) * 2 == planning.train_labels_per_shard(unmixed)
    assert "--fresh" not in step_args.distill_args(unmixed, unmixed.adapted_teacher)[0]
    whole = planning.make_plan(FULL | {"warm_start": True, "fresh_share": 0}, SETTINGS, "20261101",
                               champion=champion, previous="20261001")
    assert planning.FRESH_SHARD not in planning.text_shards(whole) and whole.student != warm.student
    assert not any("--replay" in args for args in step_args.label_teacher_args(whole, whole.adapted_teacher))
    with pytest.raises(ValueError, match="fresh_share = 1"):
        planning.full_params(FULL | {"fresh_share": 1})


def test_checkpoints_cost_at_most_one_per_hundred_steps():
    """A warm month's 60 steps write no checkpoint; a long run every 500 steps; between, a quarter."""
    assert step_args.checkpoint_every(60) == 100 and step_args.checkpoint_every(200) == 100
    assert step_args.checkpoint_every(1_000) == 250 and step_args.checkpoint_every(100_000) == 500
    demo = planning.make_plan(FULL, SETTINGS, "20261101")
    [student, *_] = step_args.distill_args(demo, "T")
    every = step_args.checkpoint_every(planning.train_steps(demo))
    assert student[student.index("--checkpoint-every") + 1] == str(every)
