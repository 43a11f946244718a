"""tracking + publish against a real MLflow store: parent/child runs, the registry, `champion`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import error_lines, run_cli

pytest.importorskip("tensorflow")
mlflow = pytest.importorskip("mlflow")

MODEL = "tiny-student"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real sqlite-backed MLflow store and a pipeline (parent) run in it."""
    root = tmp_path_factory.mktemp("mlflow")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "tests"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from bertdistill import tracking

        parent = tracking.start_pipeline("enwiki-20160101", {"wiki": "enwiki", "k": 10})
        yield {**env, tracking.PARENT_RUN_ENV: parent}, root


@pytest.fixture(scope="module")
def report(tmp_path_factory, store, tiny_teacher, labelled, tiny_student):
    env, _ = store
    out = tmp_path_factory.mktemp("report") / "report"
    run_cli("evaluate", "--teacher", str(tiny_teacher), "--student", str(tiny_student), "--heldout",
            str(labelled.parent), "--output", str(out), "--max-examples", "256", "--latency-batch", "2",
            env=env, check=True)
    return out


def _client(env):
    return mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def _children(env, step):
    client = _client(env)
    parent = client.get_run(env["BERTDISTILL_PARENT_RUN_ID"])
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`bertdistill.step` = '{step}'"
    runs = client.search_runs([parent.info.experiment_id], query)
    return client, runs


def test_a_step_logs_a_child_run_with_metrics_artifacts_and_inputs(store, report, labelled):
    env, root = store
    client, runs = _children(env, "evaluate")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    expected = json.loads((report / "report.json").read_text())
    assert run.data.metrics["student.mlm_accuracy"] == pytest.approx(expected["student"]["mlm_accuracy"])
    assert run.data.params["max_examples"] == "256"
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert artifacts == ["manifest.json", "report.json", "report.png"]
    assert (root / "artifacts").is_dir()  # beside the sqlite file, not in the working directory
    inputs = {d.dataset.name: json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs}
    assert inputs["heldout"] == str(labelled.parent)


def test_a_distill_run_logs_its_loss_curve_while_it_trains(store, tmp_path, tiny_teacher, labels_dir):
    """The run is opened as the step starts: real duration, each step's loss with its own time."""
    env, _ = store
    out = tmp_path / "student"
    from tests.conftest import distill_args

    run_cli(*distill_args(tiny_teacher, labels_dir, out), env=env, check=True)
    client, runs = _children(env, "distill")
    [run] = [r for r in runs if r.data.tags["bertdistill.output"] == str(out)]
    assert run.info.run_name == "distill" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # once each: the summary's copy is not logged again
    assert [m.value for m in history] == pytest.approx(manifest["summary"]["losses"])
    times = [m.timestamp for m in history]
    assert times == sorted(times) and run.info.start_time <= times[0] and times[-1] <= run.info.end_time
    # settings are params (the pipeline's too), not metric charts
    assert json.loads(run.data.params["resolved.student_config"])["num_hidden_layers"] == 1
    assert run.data.params["steps"] == "6" and run.data.params["pipeline.wiki"] == "enwiki"
    assert not [k for k in run.data.metrics if k.startswith("student_config") or k in ("steps", "student_layers")]
    rates = client.get_metric_history(run.info.run_id, "learning_rate")
    assert [m.step for m in rates] == [1, 2, 3, 4, 5, 6] and rates[1].value > rates[-1].value >= 0
    # the run lasted as long as the step's own training at least
    assert (run.info.end_time - run.info.start_time) / 1000 >= manifest["summary"]["seconds"]


def test_a_stopped_step_closes_its_run_killed_and_the_pipeline_closes_what_is_left(store, tmp_path, tiny_teacher,
                                                                                   labels_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    from bertdistill import tracking

    env, _ = store
    out = tmp_path / "stopped"
    from tests.conftest import distill_args

    args = distill_args(tiny_teacher, labels_dir, out)
    args[args.index("--steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "bertdistill.cli", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = _client(env)
    deadline = time.monotonic() + 120
    while not _training(client, env, out):  # the run is open and the first loss is in
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "distill logged no loss in 120 s"
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    [run] = [r for r in _children(env, "distill")[1] if r.data.tags["bertdistill.output"] == str(out)]
    assert run.info.status == "KILLED" and "Stopped" in run.data.tags["bertdistill.error"]

    # A step killed with no chance to close its run (SIGKILL, a lost node) is closed by the pipeline's end.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv(tracking.STEP_RUN_ENV, raising=False)
        mp.setenv("BERTDISTILL_MLFLOW_URI", env["MLFLOW_TRACKING_URI"])  # what the listener's process has
        parent = tracking.start_pipeline("enwiki 20160101 manual", {"wiki": "enwiki"},
                                         tags={"airflow.run_id": "manual__x", "airflow.dag_id": "bert_distillation"})
        mp.setenv(tracking.PARENT_RUN_ENV, parent)
        lost = tracking.open_step("label-teacher", "s3://b/labels/train/shard-00003.tfrecord")
        assert client.get_run(lost).info.run_name == "label-teacher train/shard-00003"
        from bertdistill.orchestration.listener import close_pipeline_runs

        assert close_pipeline_runs("bert_distillation", "manual__x", "KILLED") == [parent]
        assert close_pipeline_runs("bert_distillation", "manual__x", "KILLED") == []  # nothing left open
    assert client.get_run(lost).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"


def _training(client, env, out) -> bool:
    runs = [r for r in _children(env, "distill")[1] if r.data.tags["bertdistill.output"] == str(out)]
    return bool(runs) and runs[0].info.status == "RUNNING" and bool(client.get_metric_history(runs[0].info.run_id,
                                                                                              "loss"))


@pytest.fixture(scope="module")
def first_publish(store, report, tiny_student):
    env, _ = store
    return run_cli("publish", "--student", str(tiny_student), "--report", str(report), "--model-name", MODEL,
                   env=env, check=True)


def test_publish_registers_a_servable_model_and_crowns_the_first(store, report, tiny_student, first_publish,
                                                                 monkeypatch):
    env, _ = store
    assert "is the new champion" in first_publish.stdout
    client = _client(env)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == 1
    accuracy = json.loads((report / "report.json").read_text())["student"]["mlm_accuracy"]
    assert float(champion.tags["heldout_mlm_accuracy"]) == pytest.approx(accuracy)

    import tensorflow as tf

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # not set_tracking_uri: it would stay
    assert "held-out masked-LM top-1" in champion.description
    loaded = mlflow.tensorflow.load_model(f"runs:/{champion.run_id}/model")  # the SavedModel beside it
    serve = loaded.signatures["serving_default"]
    ids = tf.constant([[101, 1996, 103, 2003, 102]], tf.int32)
    out = serve(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=tf.zeros_like(ids))
    assert out["mlm_logits"].shape == (1, 5, 30522)
    assert out["nsp_logits"].shape == (1, 2) and out["pooled_output"].shape == (1, 384)
    # The same SavedModel sits in the store beside the student, and answers the same.
    local = tf.saved_model.load(str(tiny_student / "published" / "savedmodel")).signatures["serving_default"]
    again = local(input_ids=ids, input_mask=tf.ones_like(ids), segment_ids=tf.zeros_like(ids))
    np.testing.assert_allclose(again["mlm_logits"].numpy(), out["mlm_logits"].numpy(), atol=1e-5)


def test_the_champion_fills_in_masks_over_http(store, tiny_student, first_publish):
    """`mlflow models serve` of models:/NAME@champion, on 127.0.0.1, answers a fill-mask request with the
    same words and probabilities as the ONNX export it serves (published beside the student) computes
    for the same pieces."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    import tensorflow as tf

    from bertdistill.orchestration.mlflow_server import wait_healthy
    from bertdistill.tokenization import Vocab, wordpiece_tokenizer
    from tests.conftest import free_port

    env, _ = store
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env, "PATH": f"{Path(mlflow_bin).parent}:{os.environ['PATH']}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/ping", timeout_s=180, server=server)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}: {server.stdout.read()[-3000:] if server.poll() is not None else ''}"
                                 ) from None
        text = "paris is the capital of [MASK] and its largest [MASK]."
        body = json.dumps({"inputs": {"text": [text]}, "params": {"top_k": 3}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            [answer] = json.loads(r.read())["predictions"]
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type":
                                     "application/json"}, data=json.dumps({"inputs": {"text": ["no mask"]}}).encode())
        try:
            urllib.request.urlopen(bad, timeout=60)
            raise AssertionError("a text without [MASK] was answered")
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 500) and "put [MASK] where" in exc.read().decode()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    assert answer["text"] == text and len(answer["masks"]) == 2 and all(len(m) == 3 for m in answer["masks"])
    # The same pieces through the ONNX file the version serves give the same words and probabilities.
    from bertdistill import onnx_model

    vocab = Vocab(tiny_student / "export" / "vocab.txt")
    pieces = wordpiece_tokenizer(vocab)
    ids = [vocab.cls_id, *pieces.encode("paris is the capital of", add_special_tokens=False).ids, vocab.mask_id,
           *pieces.encode(" and its largest", add_special_tokens=False).ids, vocab.mask_id,
           *pieces.encode(".", add_special_tokens=False).ids, vocab.sep_id]
    served = _client(env).get_model_version_by_alias(MODEL, "champion").tags["serving"].split()[1]
    name = {"fp32": onnx_model.FP32, "int8": onnx_model.INT8}[served]
    session = onnx_model.session(tiny_student / "published" / "onnx" / name)
    batch = np.array([ids])
    positions = [i for i, t in enumerate(ids) if t == vocab.mask_id]
    logits = session.run(["mlm_logits"], onnx_model.feeds(batch, np.ones_like(batch), np.zeros_like(batch),
                                                          np.array([positions])))[0][0]
    probs = tf.nn.softmax(logits).numpy()
    for mask, row in zip(answer["masks"], probs, strict=True):
        best = np.argsort(-row)[:3]
        assert [w["token"] for w in mask] == [vocab.tokens[j] for j in best]
        assert [w["probability"] for w in mask] == pytest.approx(row[best].tolist(), abs=1e-5)


def test_the_published_folder_loads_in_transformers_with_the_students_logits(store, report, labelled,
                                                                            tiny_student, first_publish):
    """The Hugging Face folder publish wrote: transformers loads it with no key missing or unexpected,
    its masked-LM and next-sentence logits on real held-out examples are the student's within 1e-4,
    and pipeline("fill-mask") gives the registered model's top 5 on make demo's probes (the pyfunc
    asked in fp32, the precision transformers computes in)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import pandas as pd

    from bertdistill.bert.checkpoints import load_teacher
    from bertdistill.bert.model import Bert
    from bertdistill.orchestration.summary import PROBES
    from bertdistill.shards import open_labels
    from bertdistill.tfdata import labelled_dataset

    env, _ = store
    folder = tiny_student / "published" / "huggingface"
    assert (folder / "README.md").read_text().startswith("---\nlicense: cc-by-sa-4.0\n")
    hf, loading = transformers.BertForPreTraining.from_pretrained(str(folder), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    config, weights, vocab = load_teacher(tiny_student / "export", "export")
    student = Bert(config)
    student.assign(weights)
    info = open_labels(str(labelled), vocab.sha256, 10)
    batch = next(iter(labelled_dataset([str(labelled)], info["max_seq_length"], info["max_predictions_per_seq"],
                                       10, 32)))
    sequence = student.encode(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    ours_mlm = student.mlm_logits(sequence, batch["masked_lm_positions"]).numpy()
    with torch.no_grad():
        out = hf.eval()(input_ids=torch.tensor(batch["input_ids"].numpy(), dtype=torch.long),
                        attention_mask=torch.tensor(batch["input_mask"].numpy(), dtype=torch.long),
                        token_type_ids=torch.tensor(batch["segment_ids"].numpy(), dtype=torch.long))
    theirs_mlm = np.take_along_axis(out.prediction_logits.numpy(), batch["masked_lm_positions"].numpy()[..., None],
                                    axis=1)
    real = batch["masked_lm_weights"].numpy() > 0
    assert real.sum() > 100
    assert np.abs(ours_mlm - theirs_mlm)[real].max() < 1e-4
    assert np.abs(student.nsp_logits(sequence).numpy() - out.seq_relationship_logits.numpy()).max() < 1e-4

    fill = transformers.pipeline("fill-mask", model=str(folder), top_k=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", model_config={"precision": "fp32"})
    answers = served.predict(pd.DataFrame({"text": list(PROBES)}), params={"top_k": 5})
    for probe, answer in zip(PROBES, answers, strict=True):
        assert [w["token"] for w in answer["masks"][0]] == [c["token_str"] for c in fill(probe)], probe


def test_the_registry_version_carries_every_form_and_how_it_measured(store, report, first_publish):
    """The registered version holds the Hugging Face folder and both ONNX files, tagged with their sizes,
    the fp32 export's parity with TensorFlow and int8's held-out accuracy; it serves the precision the
    report chose and says so."""
    env, _ = store
    client = _client(env)
    version = client.get_model_version_by_alias(MODEL, "champion")
    onnx = json.loads((report / "report.json").read_text())["onnx"]
    assert float(version.tags["onnx_fp32_max_abs_logit_diff"]) < 1e-4
    assert float(version.tags["onnx_int8_mlm_accuracy"]) == pytest.approx(onnx["int8"]["mlm_accuracy"])
    assert version.tags["serving"] == f"onnx {onnx['serves']}"
    assert int(version.tags["onnx_int8_bytes"]) < int(version.tags["onnx_fp32_bytes"]) / 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version.version}")
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}")
    from pathlib import Path

    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    for name in ("artifacts/model.onnx", "artifacts/model.int8.onnx", "artifacts/huggingface/config.json",
                 "artifacts/huggingface/model.safetensors", "artifacts/huggingface/README.md"):
        assert name in files, sorted(files)
    assert served.metadata.metadata["serving"] == f"onnx {onnx['serves']}"


def test_champion_moves_only_when_the_new_version_is_better(store, report, tiny_student, first_publish):
    env, _ = store
    client = _client(env)
    # A tie keeps the incumbent.
    proc = run_cli("publish", "--student", str(tiny_student), "--report", str(report), "--model-name", MODEL,
                   "--force", env=env, check=True)
    assert "did not beat the champion" in proc.stdout
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1
    # Against a weaker incumbent the same student wins.
    client.set_model_version_tag(MODEL, "1", "heldout_mlm_accuracy", "0.0001")
    run_cli("publish", "--student", str(tiny_student), "--report", str(report), "--model-name", MODEL,
            "--force", env=env, check=True)
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 3


def test_publish_refuses_a_report_about_another_student(store, tmp_path, report, tiny_student):
    env, _ = store
    other = tmp_path / "other"
    other.mkdir()
    (other / "export").symlink_to(tiny_student / "export")
    proc = run_cli("publish", "--student", str(other), "--report", str(report), env=env)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "evaluated" in line and str(tiny_student) in line and "evaluate this student" in line
    assert not (other / "published").exists()
    _, failed = _children(env, "publish")
    assert any(r.info.status == "FAILED" and "evaluated" in r.data.tags["bertdistill.error"] for r in failed)


def test_a_new_student_is_judged_against_the_champion_on_the_same_examples(store, tmp_path, tiny_teacher,
                                                                           labels_dir, labelled, first_publish,
                                                                           report):
    """evaluate scores the current champion on this run's held-out examples; publish decides on those."""
    from tests.conftest import distill_args

    env, _ = store
    first_report = report
    client = _client(env)
    incumbent = client.get_model_version_by_alias(MODEL, "champion")
    challenger = tmp_path / "challenger"
    run_cli(*distill_args(tiny_teacher, labels_dir, challenger, "--seed", "7"), env=env, check=True)
    out = tmp_path / "report"
    run_cli("evaluate", "--teacher", str(tiny_teacher), "--student", str(challenger), "--heldout",
            str(labelled.parent), "--output", str(out), "--max-examples", "256", "--latency-batch", "2",
            "--champion", MODEL, env=env, check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["champion"]["version"] == int(incumbent.version)
    assert report["champion"]["mlm_accuracy"] == pytest.approx(float(incumbent.tags["heldout_mlm_accuracy"]))
    # The same examples and teacher labels: every champion prediction is copied from its own report.
    assert report["champion"]["predictions_reused"] == report["examples"] == 256
    assert incumbent.tags["bertdistill.report"] == str(first_report)
    kept = next((first_report / "predictions").glob("*.npz"))
    kept.rename(kept.with_suffix(".away"))  # without them, the champion is run again: the same figures
    try:
        rerun = tmp_path / "rerun"
        run_cli("evaluate", "--teacher", str(tiny_teacher), "--student", str(challenger), "--heldout",
                str(labelled.parent), "--output", str(rerun), "--max-examples", "256", "--latency-batch", "2",
                "--champion", MODEL, env=env, check=True)
    finally:
        kept.with_suffix(".away").rename(kept)
    recomputed = json.loads((rerun / "report.json").read_text())["champion"]
    assert "predictions_reused" not in recomputed
    for name in ("mlm_accuracy", "mlm_accuracy_outside_top10", "nsp_accuracy", "agreement_with_teacher"):
        assert recomputed[name] == pytest.approx(report["champion"][name], abs=1e-3), name
    assert recomputed["kl_from_teacher"] == pytest.approx(report["champion"]["kl_from_teacher"], rel=1e-4)
    gain = report["gain_over_champion"]
    assert gain["mlm_accuracy"] == pytest.approx(report["student"]["mlm_accuracy"] - report["champion"]["mlm_accuracy"])
    proc = run_cli("publish", "--student", str(challenger), "--report", str(out), "--model-name", MODEL, env=env,
                   check=True)
    assert "compared on the same held-out examples" in proc.stdout
    now = client.get_model_version_by_alias(MODEL, "champion")
    won = report["student"]["mlm_accuracy"] > report["champion"]["mlm_accuracy"]
    assert (now.version != incumbent.version) == won


def test_two_publishers_at_once_are_judged_one_after_the_other(tmp_path):
    """Both read the alias, then both set it: without the lock the later (worse) write wins.
    Each publisher here pauses between reading the champion and moving it, to make that
    interleaving certain rather than rare."""
    import threading
    import time

    from bertdistill.steps import publish

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    name = "race"
    client.create_registered_model(name)
    accuracy = {"1": 0.30, "2": 0.20}
    for version in accuracy:
        client.create_model_version(name, source=str(tmp_path / version))
        client.set_model_version_tag(name, version, publish.ACCURACY_TAG, repr(accuracy[version]))

    class SlowReader:
        """The client, with a pause after each read of the alias."""

        def __getattr__(self, attr):
            return getattr(client, attr)

        def get_model_version_by_alias(self, *args):
            try:
                return client.get_model_version_by_alias(*args)
            finally:
                time.sleep(1.5)

    results = {}

    def publish_version(version: str) -> None:
        results[version] = publish.promote(SlowReader(), name, version, accuracy[version], report={})

    better = threading.Thread(target=publish_version, args=("1",))
    better.start()
    time.sleep(0.5)  # the better one reads first; the worse one reads while it pauses
    worse = threading.Thread(target=publish_version, args=("2",))
    worse.start()
    better.join(timeout=60)
    worse.join(timeout=60)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert results["1"][0] is True
    moved, incumbent, best, _basis = results["2"]
    assert moved is False and str(incumbent.version) == "1" and best == pytest.approx(0.30)
    assert not client.search_registered_models(f"name = 'race{publish.LOCK_SUFFIX}'")  # released


def test_a_lock_left_by_a_publisher_that_died_is_removed_by_the_next(tmp_path):
    from bertdistill.steps import publish

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path / "1"))
    client.create_registered_model(f"m{publish.LOCK_SUFFIX}")  # a publisher died holding it
    with (pytest.raises(publish.TransientError, match=r"held for .* delete that registered model"),
          publish.promotion_lock(client, "m", wait_s=1.5)):
        pass
    with publish.promotion_lock(client, "m", stale_s=0.5):
        assert client.get_registered_model(f"m{publish.LOCK_SUFFIX}").creation_timestamp  # ours now
    moved, incumbent, _best, basis = publish.promote(client, "m", "1", 0.1, report={})
    assert moved and incumbent is None and basis == "no champion yet"


def test_the_pipeline_run_describes_itself_with_a_link_to_airflow_and_ends_with_its_outcome(tmp_path, monkeypatch):
    """MLflow shows `mlflow.note.content` as the run's description (markdown): a clickable link to the
    Airflow run and what it distils from the start; status, verdict and accuracies once it ends."""
    import re

    from bertdistill import tracking
    from bertdistill.manifest import Manifest

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "notes"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    url = "http://127.0.0.1:8080/dags/bert_distillation/runs/manual__2026-11-27T10%3A00%3A00%2B00%3A00"
    tags = {"airflow.dag_id": "bert_distillation", "airflow.run_id": "manual__2026-11-27T10:00:00+00:00",
            "airflow.run_type": "manual", "airflow.url": url, "bertdistill.student": "s3://b/students/3l-k10-ab"}
    params = {"wiki": "enwiki", "date": "20160101", "teacher": None, "student_layers": 3, "train_steps": 10_000,
              "batch_size": 32, "ranks": 1, "top_k": 10, "control": True}
    parent = tracking.start_pipeline("enwiki 20160101 manual", params, tags=tags)
    client = _client(env)
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    link = r"\[manual__2026-11-27T10:00:00\+00:00\]\((http[^)\s]+)\)"
    assert re.search(link, note).group(1) == url
    assert "into a 3-layer student on the enwiki dump of 20160101: 10,000 steps of 32 examples" in note
    assert "`s3://b/students/3l-k10-ab`" in note and "**Status:" not in note

    # evaluate's headline figures and verdict, and publish's version, reach the parent as the steps log them
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    words = "Distillation helped: the student beats its no-teacher control by +1.3 points."
    metrics = {"student_mlm_accuracy": 0.253, "control_mlm_accuracy": 0.24, "teacher_mlm_accuracy": 0.3}
    for step, summary in (("evaluate", {"parent_metrics": metrics, "parent_tags": {"verdict": words}}),
                          ("publish", {"parent_tags": {"model_version": "models:/m/3", "champion": "true"}})):
        tracking.log_step(step, Manifest(step, {}, {}, summary=summary), str(tmp_path / step))
    tracking.end_pipeline(parent, "FINISHED")
    run = client.get_run(parent)
    note = run.data.tags["mlflow.note.content"]
    assert run.info.status == "FINISHED" and re.search(link, note).group(1) == url
    assert "**Status: FINISHED**" in note and words in note
    assert "Held-out masked-LM top-1: student 25.3%, control 24.0%, teacher 30.0%." in note
    assert "Registered `models:/m/3` (the new champion)." in note

    # closed again (the listener after the teardown): the outcome is replaced, not appended twice
    tracking.end_pipeline(parent, "FAILED", failed_tasks="publish")
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.count("**Status:") == 1 and "**Status: FAILED** after" in note and "failed tasks: publish" in note
    assert re.search(link, note).group(1) == url


def test_a_pipeline_run_without_an_airflow_link_names_its_run_as_text(tmp_path, monkeypatch):
    from bertdistill import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracking.start_pipeline("enwiki 20160101 manual", {"wiki": "enwiki", "teacher": "minilm"},
                                     tags={"airflow.run_id": "manual__x", "airflow.dag_id": "bert_distillation"})
    note = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(parent).data.tags[
        "mlflow.note.content"]
    assert note.startswith("Airflow DAG `bert_distillation`, run `manual__x`.") and "](" not in note
    assert "Distils `minilm` into a student on the enwiki dump." in note
