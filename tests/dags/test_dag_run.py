"""The whole DAG through Airflow's own test runner (`airflow dags test`), on the real sample dump.

A tiny Hugging Face-format teacher without a masked-LM head (so the adapt branch runs) keeps it
to minutes. Checked: every step's child run under one MLflow parent run, the registered model,
that a second run of the same dump stops after check_dump, that a run cut short resumes from
the finished steps' manifests, that the next month's dump is distilled and judged against the
champion beside month one, and the same DAG with the store on a real S3 server.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import _s3_client, airflow_bin

pytest.importorskip("tensorflow")
pytest.importorskip("airflow")
pytestmark = pytest.mark.slow

TINY = {"max_dump_files": 1, "train_shards": 2, "heldout_shards": 1, "dupe_factor": 1, "max_seq_length": 64,
        "max_predictions_per_seq": 10, "adapt_steps": 2, "train_steps": 4, "batch_size": 8, "student_layers": 1}
MODEL = "bertdistill-enwiki-tiny-bert-1l-64"  # one registered model per wiki, teacher, student shape, length
STEPS = ["fetch-dump", "extract", "build-corpus", "make-examples", "fetch-teacher", "adapt-teacher",
         "label-teacher", "distill", "evaluate", "publish"]


def dags_test(env: dict, conf: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([airflow_bin(), "dags", "test", "bert_distillation", "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=1200)
    return proc


def run_env(airflow_env: dict, sample, teacher, store: str, mlflow_db) -> dict:
    return {**airflow_env, "BERTDISTILL_STORE": store, "BERTDISTILL_MIRROR": str(sample / "mirror"),
            "BERTDISTILL_TEACHER": str(teacher), "BERTDISTILL_MLFLOW_URI": f"sqlite:///{mlflow_db}"}


def tasks_run(output: str) -> set[str]:
    """The task ids the test runner started, from its log lines."""
    import re

    return set(re.findall(r"\[DAG TEST\] running task <TaskInstance: bert_distillation\.(\w+)", output))


def runs(mlflow_db):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    experiment = client.get_experiment_by_name("bertdistill")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def local_run(airflow_env, sample, hf_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("dagrun")
    env = run_env(airflow_env, sample, hf_teacher, str(root / "store"), root / "mlflow.db")
    proc = dags_test(env, TINY)
    return env, root, proc


def test_the_dag_runs_end_to_end_and_registers_the_student(local_run):
    _env, root, proc = local_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "publish" in tasks_run(proc.stdout + proc.stderr)
    client, all_runs = runs(root / "mlflow.db")
    [parent] = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("enwiki 20160101 manual ")
    assert not [r.info.run_name for r in all_runs if r.info.status == "RUNNING"]
    # The no-teacher control ran beside the student, and what the teacher added shows on the parent run.
    gain = parent.data.metrics
    assert gain["distillation_gain_ci95_low"] <= gain["distillation_gain"] <= gain["distillation_gain_ci95_high"]
    assert gain["distillation_gain"] == pytest.approx(gain["student_mlm_accuracy"] - gain["control_mlm_accuracy"])
    assert "no-teacher control" in parent.data.tags["bertdistill.verdict"]
    # The runs table compares months without expanding: headline figures and the model on the parent.
    for key in ("student_mlm_accuracy", "teacher_mlm_accuracy", "baseline_mlm_accuracy", "speedup_encoder",
                "student_parameters", "teacher_parameters", "pipeline_wall_seconds"):
        assert key in gain, key
    assert 0 < gain["student_parameters"] <= gain["teacher_parameters"]  # the tiny teacher has 1 layer too
    assert gain["pipeline_wall_seconds"] * 1000 <= parent.info.end_time - parent.info.start_time + 1000
    assert parent.data.tags["bertdistill.model_version"] == f"models:/{MODEL}/1"
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development")
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    steps = sorted({r.data.tags["bertdistill.step"] for r in children})
    assert steps == sorted(STEPS)
    assert sum(r.data.tags["bertdistill.step"] == "label-teacher" for r in children) == 3  # 2 train + 1 held-out
    assert sum(r.data.tags["bertdistill.step"] == "distill" for r in children) == 2  # the student and its control
    names = sorted(r.info.run_name for r in children)
    assert "distill (no-teacher control)" in names and "label-teacher heldout/shard-00000" in names, names
    assert all(r.info.end_time - r.info.start_time > 1000 for r in children
               if r.data.tags["bertdistill.step"] in ("distill", "evaluate"))  # opened at the start
    [extract] = [r for r in children if r.data.tags["bertdistill.step"] == "extract"]
    [dump] = [json.loads(d.dataset.source)["uri"] for d in extract.inputs.dataset_inputs]
    assert dump.startswith(str(root / "store" / "dumps" / "enwiki" / "20160101"))
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == 1
    published = list((root / "store" / "runs" / "enwiki-20160101" / "students").glob(
        "*/published/savedmodel/saved_model.pb"))
    assert len(published) == 1


def test_the_demo_summary_reads_the_run_and_asks_the_champion(local_run):
    """What `make demo` prints last: the run's figures and the champion's answers to its probes, loaded
    as `mlflow models serve` loads it (the tiny student's words are not checked, only that it answered)."""
    import sys

    from bertdistill.orchestration.summary import PROBES

    env, _root, first = local_run
    assert first.returncode == 0
    proc = subprocess.run([sys.executable, "-m", "bertdistill.orchestration.summary"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"registered model:  {MODEL} version 1 (alias champion)" in proc.stdout
    answered = [line for line in proc.stdout.splitlines() if line.strip().startswith(PROBES)]
    assert len(answered) == len(PROBES)
    for line in answered:
        words = line.split("]", 1)[1].split(",")
        assert len(words) == 3 and all(0 <= float(w.split()[-1]) <= 1 for w in words), line


def test_a_failed_run_closes_its_mlflow_runs(airflow_env, sample, hf_teacher, tmp_path):
    """A step that fails (here fetch-teacher, given a teacher that does not exist) fails the run; the
    plugin's listener, called by the runner as the run ends, closes the pipeline's MLflow run FAILED,
    naming the failed task, and no run stays open."""
    env = run_env(airflow_env, sample, hf_teacher, str(tmp_path / "store"), tmp_path / "mlflow.db")
    proc = dags_test(env, {**TINY, "teacher": str(tmp_path / "no-such-teacher")})
    out = proc.stdout + proc.stderr
    assert "fetch_teacher" in tasks_run(out) and "publish" not in tasks_run(out), out[-4000:]
    _client, all_runs = runs(tmp_path / "mlflow.db")
    [parent] = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED", parent.data.tags
    assert "fetch_teacher" in parent.data.tags["bertdistill.failed_tasks"]
    assert parent.info.run_name.startswith("enwiki 20160101 manual ")
    assert parent.data.tags["airflow.dag_id"] == "bert_distillation"
    assert not [r.info.run_name for r in all_runs if r.info.status == "RUNNING"]
    [failed] = [r for r in all_runs if r.data.tags.get("bertdistill.step") == "fetch-teacher"]
    assert failed.info.status == "FAILED" and "no-such-teacher" in failed.data.tags["bertdistill.error"]
    finished = {r.data.tags["bertdistill.step"] for r in all_runs if r.info.status == "FINISHED"}
    assert {"fetch-dump", "extract", "build-corpus"} <= finished  # the branch that did not need the teacher


def transformers_model(folder):
    """transformers' BertForPreTraining from a platform folder: its config file read by transformers,
    its weights renamed by the platform's own Hugging Face name map."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    from bertdistill.bert.checkpoints import hf_to_google

    model = transformers.BertForPreTraining(transformers.BertConfig.from_json_file(folder / "bert_config.json"))
    ours = load_file(str(folder / "model.safetensors"))
    state = {}
    for name in model.state_dict():
        mapped = hf_to_google(name)
        if name == "cls.predictions.decoder.weight":
            mapped = ("bert/embeddings/word_embeddings", False)
        if mapped is not None:
            state[name] = torch.from_numpy(ours[mapped[0]].T.copy() if mapped[1] else ours[mapped[0]])
    missing = set(model.state_dict()) - set(state) - {"bert.embeddings.position_ids"}
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    return model.eval()


def test_the_teachers_exact_gelu_survives_every_saved_folder_and_the_savedmodel(local_run, hf_teacher):
    """The source says "gelu" in Hugging Face's meaning (erf). Every folder the run wrote must mean the
    same to the platform and to transformers, and the published SavedModel must compute it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np
    import tensorflow as tf

    from bertdistill.bert.config import BertConfig

    _env, root, proc = local_run
    assert proc.returncode == 0
    assert json.loads((hf_teacher / "config.json").read_text())["hidden_act"] == "gelu"
    configs = sorted((root / "store").rglob("bert_config.json"))
    kinds = {p.parent.name if p.parent.name != "export" else p.parent.parent.name.split("-")[0] for p in configs}
    assert len(configs) >= 3, configs  # fetched teacher, adapted teacher, student export
    assert {"tiny-bert", "tiny-bert-adapted-2-lr0.0004"} <= kinds
    for path in configs:
        assert BertConfig.from_json_file(path).hidden_act == "gelu", path
        assert transformers.BertConfig.from_json_file(path).hidden_act == "gelu", path
    [export] = (root / "store" / "runs" / "enwiki-20160101" / "students").glob("*/export")
    [saved] = (root / "store" / "runs" / "enwiki-20160101" / "students").glob("*/published/savedmodel")
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 30000, (2, 12))
    served = tf.saved_model.load(str(saved)).signatures["serving_default"](
        input_ids=tf.constant(ids, tf.int32), input_mask=tf.ones([2, 12], tf.int32),
        segment_ids=tf.zeros([2, 12], tf.int32))
    with torch.no_grad():
        reference = transformers_model(export)(input_ids=torch.tensor(ids), attention_mask=torch.ones(2, 12,
                                               dtype=torch.long), token_type_ids=torch.zeros(2, 12, dtype=torch.long))
    np.testing.assert_allclose(served["mlm_logits"].numpy(), reference.prediction_logits.numpy(), atol=2e-4)
    np.testing.assert_allclose(served["nsp_logits"].numpy(), reference.seq_relationship_logits.numpy(), atol=2e-4)


def test_a_second_run_of_the_same_dump_stops_after_the_check(local_run):
    env, root, first = local_run
    assert first.returncode == 0
    _, before = runs(root / "mlflow.db")
    proc = dags_test(env, TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "was already distilled and published" in out
    assert tasks_run(out) == {"check_dump"}
    _, after = runs(root / "mlflow.db")
    assert len(after) == len(before)  # no new parent or child run


def test_a_run_cut_short_resumes_from_the_finished_steps(local_run):
    """As if killed during evaluate: its output and publish's are gone; the rerun redoes only those."""
    env, root, first = local_run
    assert first.returncode == 0
    [student] = (root / "store" / "runs" / "enwiki-20160101" / "students").iterdir()
    shutil.rmtree(student / "published")
    shutil.rmtree(student / "report")
    kept = {p: p.read_bytes() for p in (root / "store").rglob("_MANIFEST*.json") if "published" not in str(p)
            and "report" not in str(p)}
    proc = dags_test(env, TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for step in ("make-examples", "label-teacher", "distill", "adapt-teacher"):
        assert f"{step}: skipped" in out
    assert all(p.read_bytes() == data for p, data in kept.items())  # finished steps untouched
    assert (student / "report" / "report.json").exists()
    assert (student / "published" / "savedmodel" / "saved_model.pb").exists()
    client, _ = runs(root / "mlflow.db")
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2


def test_the_next_months_dump_is_distilled_scored_against_the_champion_and_kept_beside_it(local_run, sample,
                                                                                         tmp_path):
    """The generator puts enwiki 20160201 on a copy of the mirror (edited, deleted and new articles); the
    same settings with date latest and a warm start pick it up, start student and control from month
    one's champion, distil it, score that champion on month two's held-out examples and move
    `champion` only if the new student beats it there. The registry then holds a version per month,
    each tagged with its dump, and month one's outputs are untouched."""
    from tests.next_dump import NEXT_DATE, make_next_month
    from tests.test_next_dump import CACHE

    env, root, first = local_run
    assert first.returncode == 0
    mirror = tmp_path / "mirror"
    shutil.copytree(sample / "mirror", mirror)
    make_next_month(mirror, CACHE)
    month_one = {p: p.read_bytes() for p in (root / "store" / "runs" / "enwiki-20160101").rglob("*") if p.is_file()}
    client, _ = runs(root / "mlflow.db")
    incumbent = client.get_model_version_by_alias(MODEL, "champion")
    proc = dags_test({**env, "BERTDISTILL_MIRROR": str(mirror)}, {**TINY, "warm_start": True})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ran = tasks_run(proc.stdout + proc.stderr)
    assert "publish" in ran
    assert all(p.read_bytes() == data for p, data in month_one.items())  # nothing of month one rewritten
    month_two = root / "store" / "runs" / f"enwiki-{NEXT_DATE}"
    # month one's adapted teacher (same teacher, same settings) labels month two: no adapt_teacher run
    assert "adapt_teacher" not in ran and "label_teacher" in ran and not (month_two / "teachers").exists()
    [adapted] = (root / "store" / "runs" / "enwiki-20160101" / "teachers").glob("*/*/*")
    # the articles of unchanged pages are copied from month one's, not extracted again
    [extracted] = month_two.glob("articles/*/_MANIFEST.json")
    extracted = json.loads(extracted.read_text())["summary"]
    assert extracted["written"] > extracted["reused"] > 60, extracted
    assert extracted["reused_from"][0].startswith(str(root / "store" / "runs" / "enwiki-20160101" / "articles"))
    # month two's held-out labels are month one's wherever its examples are: its articles mostly did not change
    [heldout] = month_two.glob("labels/*/*/*/heldout/_MANIFEST.shard-00000.tfrecord.json")
    labelled = json.loads(heldout.read_text())["summary"]
    assert labelled["examples"] > labelled["reused"] > labelled["examples"] / 2, labelled
    assert labelled["reused_from"][0].startswith(str(root / "store" / "runs" / "enwiki-20160101" / "labels"))
    # the train shards replay unchanged examples only, their labels copied: no teacher ran on them
    train = list(month_two.glob("labels/*/*/*/train/_MANIFEST.shard-*.tfrecord.json"))
    assert train
    for shard in train:
        replayed = json.loads(shard.read_text())
        assert replayed["params"]["replay"] and replayed["summary"]["reused"] == replayed["summary"]["examples"] > 0
        assert replayed["summary"]["teacher_load_seconds"] == 0, replayed["summary"]
    [student] = (month_two / "students").iterdir()
    evaluated = json.loads((student / "report" / "_MANIFEST.json").read_text())
    assert evaluated["inputs"]["teacher"].split()[0] == str(adapted)
    # the temporal held-out: half of the new and changed articles bound for training, kept out of it
    text = json.loads(next(month_two.glob("text/*/_MANIFEST.json")).read_text())["summary"]
    assert 0 < text["temporal_documents"] < text["new_or_changed_documents"] <= 15 + 12
    assert text["fresh_documents"] > 0
    assert text["temporal_documents"] + text["fresh_documents"] <= text["new_or_changed_documents"]
    for folder in (student, student / "control"):  # both warm-started from the champion, for 2 of the 4 steps
        manifest = json.loads((folder / "_MANIFEST.json").read_text())
        assert manifest["inputs"]["init_from"].split()[0] == incumbent.tags["bertdistill.export"]
        assert manifest["params"]["steps"] == 2
        # half of each batch from the new and changed articles that train (the fresh shard), half replay
        assert manifest["inputs"]["fresh"].split()[0].endswith("/fresh") and manifest["summary"]["fresh_share"] == 0.5
    report = json.loads((student / "report" / "report.json").read_text())
    assert report["champion"]["version"] == int(incumbent.version)  # scored on month two's held-out examples
    # ... run again only where an example changed: the others' predictions come from its month-one report
    assert report["champion"]["predictions_reused"] == labelled["reused"], (report["champion"], labelled)
    temporal = report["temporal"]
    assert temporal["positions"] > 0 and {"student", "control", "teacher", "champion"} <= set(temporal)
    assert "last month's champion" in temporal["verdict"]
    versions = {v.tags.get("dump"): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert {"enwiki 20160101", f"enwiki {NEXT_DATE}"} <= set(versions), sorted(map(str, versions))
    champion = client.get_model_version_by_alias(MODEL, "champion")
    won = report["student"]["mlm_accuracy"] > report["champion"]["mlm_accuracy"]
    assert champion.version == (versions[f"enwiki {NEXT_DATE}"].version if won else incumbent.version)
    [parent] = [r for r in runs(root / "mlflow.db")[1] if r.data.params.get("date") == NEXT_DATE
                and "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith(f"enwiki {NEXT_DATE} manual ")
    assert parent.data.params["warm_start"] == "true"
    assert parent.data.tags["bertdistill.dump"] == f"enwiki {NEXT_DATE}"  # as its registry version's `dump` tag
    assert parent.data.metrics["temporal_champion_mlm_accuracy"] == temporal["champion"]["mlm_accuracy"]
    steps = [r for r in runs(root / "mlflow.db")[1] if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert steps and all(r.data.metrics["step_cpu_seconds"] > 0 for r in steps if r.info.status == "FINISHED")

@pytest.mark.s3
def test_the_same_dag_with_the_store_on_s3(airflow_env, sample, hf_teacher, seaweed, tmp_path):
    store = "s3://bertdistill-test/dagrun"
    env = {**run_env(airflow_env, sample, hf_teacher, store, tmp_path / "mlflow.db"), **seaweed,
           "BERTDISTILL_MLFLOW_ARTIFACTS": "s3://bertdistill-test/mlflow"}
    proc = dags_test(env, TINY)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    keys = [o["Key"] for page in _s3_client(seaweed).get_paginator("list_objects_v2").paginate(
        Bucket="bertdistill-test") for o in page.get("Contents", [])]
    run = "dagrun/runs/enwiki-20160101/"
    assert any(k.startswith(run + "examples/") and k.endswith(".tfrecord") for k in keys)
    assert any(k.startswith(run + "labels/") and k.endswith(".tfrecord") for k in keys)
    assert any(k.startswith(run + "students/") and k.endswith("published/savedmodel/saved_model.pb") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys)  # MLflow's artifacts too
    assert not (tmp_path / "artifacts").exists()
    client, _all_runs = runs(tmp_path / "mlflow.db")
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1


def test_settings_that_cannot_run_fail_check_dump_once_with_their_reason(airflow_env, sample, hf_teacher, tmp_path):
    """More Horovod ranks than train shards: check_dump refuses before any step or MLflow run, with the
    reason as the task's error, and is not retried (the same settings fail the same way)."""
    env = run_env(airflow_env, sample, hf_teacher, str(tmp_path / "store"), tmp_path / "mlflow.db")
    proc = dags_test(env, {**TINY, "ranks": 3})
    out = proc.stdout + proc.stderr
    assert tasks_run(out) == {"check_dump"}, out[-3000:]
    assert "ranks = 3 but train_shards = 2" in out and "AirflowFailException" in out
    assert "up_for_retry" not in out
    if (tmp_path / "mlflow.db").exists():  # the listener looked for a pipeline run to close: there is none
        import mlflow

        assert mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name(
            "bertdistill") is None
