"""label-teacher and adapt-teacher: the compact label cache, its guards, and head fitting."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from bertdistill.bert.checkpoints import load_teacher
from bertdistill.errors import StepError
from bertdistill.records import PRECISION, PROB_FLOOR, decode_labels, encode_labels, pretraining_shapes, read_labelled
from bertdistill.shards import open_labels
from tests.conftest import commit_as, error_lines, run_cli

tf = pytest.importorskip("tensorflow")
K, P, L = 10, 20, 128


def test_labels_are_the_teachers_top_k_sorted_and_sum_to_one(labelled, small_examples, tiny_teacher):
    from bertdistill.bert.model import Bert

    with open(labelled, "rb") as f:
        rows = list(read_labelled(f, P, K))
    manifest = json.loads((labelled.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())
    assert len(rows) == manifest["outputs"]["shard-00000.tfrecord"]["records"] > 1000
    real = np.stack([r["masked_lm_weights"] for r in rows]) > 0
    probs = np.stack([r["teacher_topk_probs"].reshape(P, K) for r in rows])
    rest = np.stack([r["teacher_rest_prob"] for r in rows])
    assert np.abs(probs.sum(-1) + rest - 1)[real].max() < 1e-3
    assert (np.diff(probs, axis=-1)[real] <= 1e-7).all()
    assert (probs[~real] == 0).all() and (rest[~real] == 0).all()
    # Recompute a batch with the model itself: same ids, probabilities within the stated precision.
    config, weights, _ = load_teacher(tiny_teacher, str(tiny_teacher))
    model = Bert(config)
    model.assign(weights)
    batch = {k: np.stack([r[k] for r in rows[:32]]) for k in ("input_ids", "input_mask", "segment_ids",
                                                              "masked_lm_positions")}
    sequence = model.encode(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
    full = tf.nn.softmax(model.mlm_logits(sequence, batch["masked_lm_positions"])).numpy()
    nsp = model.nsp_logits(sequence).numpy()
    ids = np.stack([r["teacher_topk_ids"].reshape(P, K) for r in rows[:32]])
    mask = real[:32]
    np.testing.assert_array_equal(ids[mask][:, 0], full.argmax(-1)[mask])
    expected = np.take_along_axis(full, ids, -1)[mask]
    big = expected > PROB_FLOOR  # smaller ones are stored as the floor
    assert np.abs(probs[:32][mask][big] / expected[big] - 1).max() <= PRECISION + 1e-5
    np.testing.assert_allclose(rest[:32][mask], 1 - np.sort(full, -1)[..., -K:].sum(-1)[mask], atol=2e-3)
    np.testing.assert_allclose(np.stack([r["teacher_nsp_logits"] for r in rows[:32]]), nsp, atol=2e-2)
    # The cache stays small: the seed's fp32 + int64 labels took about 1.3 KB per example.
    assert manifest["summary"]["label_bytes_per_example"] <= 620


@pytest.mark.parametrize("shape", ["dirichlet", "confident", "flat then a cliff", "flat"])
def test_the_reader_delivers_the_stated_precision_on_any_distribution(shape):
    """What distill reads, not what is stored: within PRECISION (3.2%) of the teacher for every
    probability above the floor, whatever the rest of the position looks like."""
    rng = np.random.default_rng(7)
    n, k, vocab = 400, 10, 30522
    logits = rng.normal(0, 3, (n, vocab))
    if shape == "confident":
        logits[:, 5] += 25
    elif shape == "flat then a cliff":  # nine probable words, the tenth below the floor
        logits[:] = rng.normal(-30, 1, (n, vocab))
        logits[:, :9] = rng.normal(0, 0.3, (n, 9))
        logits[:, 9:3000] = rng.normal(-3.5, 0.5, (n, 2991))
    elif shape == "flat":  # a thousand near-equal words: the top 10 hold about 1%
        logits[:] = -30
        logits[:, :1000] = rng.normal(0, 0.2, (n, 1000))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1)[:, :k]
    top = np.take_along_axis(p, ids, 1)
    rest = 1 - top.sum(1)
    blob = encode_labels(np.array([n]), ids[None], top[None], rest[None], np.zeros((1, 2)))[0]
    got = decode_labels(blob, n, k, n)
    read = got["teacher_topk_probs"].reshape(n, k)
    np.testing.assert_array_equal(got["teacher_topk_ids"].reshape(n, k), ids)
    above = top > PROB_FLOOR
    assert above.any()
    assert np.abs(read[above] / top[above] - 1).max() <= PRECISION + 1e-6
    assert np.abs(got["teacher_rest_prob"] - rest).max() <= 1e-5


def test_tensorflow_parses_labelled_records(labelled):
    spec = {name: tf.io.FixedLenFeature([n], tf.int64 if kind == "int64" else tf.float32)
            for name, (kind, n) in pretraining_shapes(L, P).items()}
    spec["teacher"] = tf.io.FixedLenFeature([], tf.string)
    parsed = next(iter(tf.data.TFRecordDataset(str(labelled)).batch(8).map(lambda r: tf.io.parse_example(r, spec))))
    assert parsed["teacher"].shape == (8,) and parsed["input_ids"].shape == (8, L)


def test_reader_refuses_other_vocab_or_k(labelled):
    made = json.loads((labelled.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())["summary"]
    assert open_labels(str(labelled), made["vocab_sha256"], K)["top_k"] == K
    with pytest.raises(StepError, match="another vocab"):
        open_labels(str(labelled), "0" * 64, K)
    with pytest.raises(StepError, match="top-10 labels but top-5"):
        open_labels(str(labelled), made["vocab_sha256"], 5)


def test_examples_made_with_another_vocab_are_refused(tmp_path, sample, corpus, tiny_teacher):
    tokens = (sample / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens[2000], tokens[2001] = tokens[2001], tokens[2000]  # same size, other ids
    other = tmp_path / "other-vocab.txt"
    other.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    ex = tmp_path / "ex" / "s.tfrecord"
    run_cli("make-examples", "--input", str(corpus / "text" / "heldout" / "shard-00000.txt"), "--output", str(ex),
            "--vocab-file", str(other), "--dupe-factor", "1", check=True)
    out = tmp_path / "labels" / "s.tfrecord"
    proc = run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(ex), "--output", str(out))
    assert proc.returncode == 2 and "made with another vocab" in error_lines(proc)[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_a_bad_crc_is_refused_and_leaves_nothing(tmp_path, small_examples, tiny_teacher):
    broken = tmp_path / "ex" / small_examples.name
    broken.parent.mkdir()
    shutil.copyfile(small_examples, broken)
    shutil.copyfile(small_examples.parent / f"_MANIFEST.{small_examples.name}.json",
                    broken.parent / f"_MANIFEST.{small_examples.name}.json")
    data = bytearray(broken.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    out = tmp_path / "labels" / "s.tfrecord"
    proc = run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(broken), "--output", str(out))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "corrupt" in line and "regenerate" in line and broken.name in line
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_a_teacher_without_masked_lm_head_cannot_label(tmp_path, sample, small_examples):
    teacher = tmp_path / "minilm"
    run_cli("fetch-teacher", "--source", str(sample / "minilm"), "--output", str(teacher), check=True)
    proc = run_cli("label-teacher", "--teacher", str(teacher), "--input", str(small_examples), "--output",
                   str(tmp_path / "l" / "x.tfrecord"))
    assert proc.returncode == 2 and "run adapt-teacher" in error_lines(proc)[0]


def test_adapt_teacher_fits_heads_on_a_frozen_encoder(tmp_path, sample, small_examples):
    teacher = tmp_path / "minilm"
    run_cli("fetch-teacher", "--source", str(sample / "minilm"), "--output", str(teacher), check=True)
    examples = tmp_path / "examples"
    for split in ("train", "heldout"):
        (examples / split).mkdir(parents=True)
        for f in small_examples.parent.iterdir():
            shutil.copyfile(f, examples / split / f.name)
    out = tmp_path / "adapted"
    args = ["adapt-teacher", "--teacher", str(teacher), "--examples", str(examples), "--output", str(out),
            "--freeze-encoder", "--steps", "4", "--batch-size", "8", "--eval-examples", "64", "--warmup-steps", "1",
            "--learning-rate", "1e-3"]
    proc = run_cli(*args, check=True)
    assert "held-out masked-LM top-1" in proc.stdout
    summary = json.loads((out / "_MANIFEST.json").read_text())["summary"]
    assert 0 <= summary["heldout_mlm_accuracy"] <= 1 and summary["trained"] == "heads"
    _, adapted, _ = load_teacher(out, str(out))  # all heads now present
    _, original, _ = load_teacher(teacher, str(teacher), required_heads=())
    for name in ("bert/encoder/layer_0/attention/self/query/kernel", "bert/embeddings/word_embeddings"):
        np.testing.assert_array_equal(adapted[name], original[name])  # frozen means frozen
    assert not np.allclose(adapted["cls/predictions/transform/dense/kernel"],
                           load_teacher(out, str(out))[1]["cls/predictions/transform/dense/kernel"] * 0)
    again = run_cli(*args, check=True)
    assert "skipped" in again.stderr


@pytest.mark.s3
def test_teacher_steps_on_s3(s3_env, s3_prefix, tmp_path, sample, tiny_teacher, small_examples, labelled):
    """fetch-teacher into s3://, label-teacher from and to s3://: the same bytes as locally."""
    from bertdistill.store import open_folder

    env = {**s3_env, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    store = open_folder(s3_prefix)
    run_cli("fetch-teacher", "--source", str(sample / "minilm"), "--output", f"{s3_prefix}/teachers/minilm",
            env=env, check=True)
    assert json.loads(store.read_bytes("teachers/minilm/_MANIFEST.json"))["summary"]["heads"] == ["pooler"]
    for name in ("bert_config.json", "vocab.txt", "model.safetensors", "_MANIFEST.json"):  # a finished teacher
        store.write_bytes(f"teachers/tiny/{name}", (tiny_teacher / name).read_bytes())
    for f in small_examples.parent.iterdir():
        store.write_bytes(f"examples/{f.name}", f.read_bytes())
    run_cli("label-teacher", "--teacher", f"{s3_prefix}/teachers/tiny", "--input",
            store.child_uri(f"examples/{small_examples.name}"), "--output", f"{s3_prefix}/labels/{labelled.name}",
            env=env, check=True)
    assert store.read_bytes(f"labels/{labelled.name}") == labelled.read_bytes()
    assert not any(p.is_file() for p in (tmp_path / "scratch").rglob("*")), "staged copies are cleaned up"


def test_max_examples_labels_the_first_n_and_says_so(labelled, small_examples, tiny_teacher, tmp_path):
    from bertdistill.tfrecord import read_records

    out = tmp_path / "first" / "shard-00000.tfrecord"
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(small_examples), "--output", str(out),
            "--top-k", "10", "--max-examples", "100", check=True)
    with open(out, "rb") as f:
        first = list(read_records(f))
    with open(labelled, "rb") as f:
        full = list(read_records(f))
    assert len(first) == 100 < len(full)
    # The same examples in the same order; the first batch (64, the same shape) byte for byte; the
    # last batch of 36 runs other kernels, so its float labels may differ in the last bits.
    assert first[:64] == full[:64]
    from bertdistill.records import LABEL_FEATURE
    from bertdistill.tfrecord import decode_example

    for a, b in zip(first, full, strict=False):
        da, db = decode_example(a), decode_example(b)
        assert {k: str(v) for k, v in da.items() if k != LABEL_FEATURE.decode()} == {
            k: str(v) for k, v in db.items() if k != LABEL_FEATURE.decode()}
    manifest = json.loads((out.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())
    assert manifest["outputs"]["shard-00000.tfrecord"]["records"] == 100 and manifest["params"]["max_examples"] == 100


@pytest.fixture(scope="module")
def shifted_examples(tmp_path_factory, corpus, sample):
    """The held-out text with one article edited, made into examples as next month's make-examples would."""
    tmp_path = tmp_path_factory.mktemp("next-month")
    docs = (corpus / "text" / "heldout" / "shard-00000.txt").read_text(encoding="utf-8").split("\n\n")
    docs[1] = "A sentence written this month. " + docs[1]
    text = tmp_path / "text" / "heldout" / "shard-00000.txt"
    text.parent.mkdir(parents=True)
    text.write_text("\n\n".join(docs), encoding="utf-8")
    commit_as("build-corpus", tmp_path / "text")
    examples = tmp_path / "examples" / "heldout" / "shard-00000.tfrecord"
    run_cli("make-examples", "--input", str(text), "--output", str(examples), "--vocab-file",
            str(sample / "vocab.txt"), "--dupe-factor", "1", check=True)
    return examples


@pytest.fixture(scope="module")
def last_month(tmp_path_factory, labelled, small_examples, tiny_teacher):
    """Last month's labels folder: the held-out labels of this teacher at k=10, beside a set at k=5 that
    must never be reused for k=10."""
    root = tmp_path_factory.mktemp("last-month") / "labels"
    shutil.copytree(labelled.parent, root / "tiny-k10" / "heldout")
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(small_examples), "--output",
            str(root / "tiny-k5" / "heldout" / "shard-00000.tfrecord"), "--top-k", "5", "--max-examples", "64",
            check=True)
    return root


def test_last_months_labels_are_reused_for_the_examples_that_did_not_change(
        tmp_path, shifted_examples, tiny_teacher, last_month, labelled):
    from bertdistill.records import split_label
    from bertdistill.tfrecord import read_records

    examples = shifted_examples
    reused = tmp_path / "labels" / "heldout" / "shard-00000.tfrecord"
    fresh = tmp_path / "fresh" / "heldout" / "shard-00000.tfrecord"
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(examples), "--output", str(reused),
            "--top-k", "10", "--reuse", str(last_month), check=True)
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(examples), "--output", str(fresh),
            "--top-k", "10", check=True)
    summary = json.loads((reused.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())["summary"]
    assert summary["reused_from"] == [str(last_month / "tiny-k10" / "heldout" / "shard-00000.tfrecord")]
    assert 0.8 * summary["examples"] < summary["reused"] < summary["examples"]
    with open(labelled, "rb") as f:
        before = {split_label(r)[0] for r in read_records(f)}
    with open(reused, "rb") as f, open(fresh, "rb") as g:
        pairs = list(zip(read_records(f), read_records(g), strict=True))
    copied = [split_label(a)[0] in before for a, _ in pairs]
    assert sum(copied) == summary["reused"]
    # Same examples in the same order; a copied label is the one the teacher gives now (batches of other
    # examples around it may move a probability by one step of the cache's precision, never more).
    labels = [(read_labelled_one(a), read_labelled_one(b)) for a, b in pairs]
    assert all(split_label(a)[0] == split_label(b)[0] for a, b in pairs)
    ids_equal = [np.array_equal(x["teacher_topk_ids"], y["teacher_topk_ids"]) for x, y in labels]
    assert np.mean(ids_equal) > 0.99
    assert max(np.abs(x["teacher_topk_probs"] - y["teacher_topk_probs"]).max() for x, y in labels) < 0.05


def read_labelled_one(record: bytes) -> dict:
    import io

    from bertdistill.tfrecord import frame

    return next(read_labelled(io.BytesIO(frame(record)), P, K))


def test_a_shard_found_whole_in_last_months_labels_never_loads_tensorflow(
        tmp_path, small_examples, tiny_teacher, last_month, labelled):
    """Every example found: the labels are copied, byte for byte, with TensorFlow made unimportable."""
    blocker = tmp_path / "no-tf" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('label-teacher imported TensorFlow')\n")
    out = tmp_path / "labels" / "heldout" / "shard-00000.tfrecord"
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(small_examples), "--output", str(out),
            "--top-k", "10", "--reuse", str(last_month), check=True,
            env={"PYTHONPATH": f"{blocker.parent}:{os.environ.get('PYTHONPATH', '')}"})
    assert out.read_bytes() == labelled.read_bytes()


def test_replay_keeps_the_examples_found_in_last_months_labels_and_labels_others_only_when_short(
        tmp_path, shifted_examples, tiny_teacher, last_month, labelled):
    """A warm month's train shard: the first N examples found last month, their labels copied, with
    TensorFlow made unimportable; asked for more than were found, the first others are labelled."""
    from bertdistill.records import split_label
    from bertdistill.tfrecord import read_records

    with open(labelled, "rb") as f:
        before = {split_label(r)[0]: r for r in read_records(f)}
    with open(shifted_examples, "rb") as f:
        examples = list(read_records(f))
    found = [e for e in examples if e in before]
    assert 0 < len(found) < len(examples)
    blocker = tmp_path / "no-tf" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('label-teacher imported TensorFlow')\n")
    out = tmp_path / "replay" / "heldout" / "shard-00000.tfrecord"
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(shifted_examples), "--output", str(out),
            "--top-k", "10", "--max-examples", "500", "--reuse", str(last_month), "--replay", check=True,
            env={"PYTHONPATH": f"{blocker.parent}:{os.environ.get('PYTHONPATH', '')}"})
    with open(out, "rb") as f:
        kept = list(read_records(f))
    assert kept == [before[e] for e in found[:500]]  # in the shard's order, labels byte for byte
    summary = json.loads((out.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())["summary"]
    assert summary["reused"] == summary["examples"] == 500
    assert summary["passed_over"] == examples.index(found[499]) + 1 - 500 > 0

    short = tmp_path / "short" / "heldout" / "shard-00000.tfrecord"
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(shifted_examples), "--output",
            str(short), "--top-k", "10", "--max-examples", str(len(found) + 5), "--reuse", str(last_month),
            "--replay", check=True)
    with open(short, "rb") as f:
        records = list(read_records(f))
    assert records[:len(found)] == [before[e] for e in found]
    others = [e for e in examples if e not in before][:5]
    assert [split_label(r)[0] for r in records[len(found):]] == others  # labelled by the teacher
    summary = json.loads((short.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())["summary"]
    assert (summary["examples"], summary["reused"]) == (len(found) + 5, len(found))
    assert summary["passed_over"] == len(examples) - len(found) - 5


def test_replay_needs_reuse_and_max_examples(tmp_path, small_examples, tiny_teacher):
    result = run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(small_examples), "--output",
                     str(tmp_path / "x.tfrecord"), "--replay")
    assert result.returncode == 2 and error_lines(result) == [
        "error: label-teacher: --replay keeps the first --max-examples examples found in --reuse's labels: give both"]
