"""The TF2 BERT against references no one here wrote: transformers' BertModel and Google's
checkpoint format written by tf.compat.v1's own Saver."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from bertdistill.bert.checkpoints import load_teacher, read_hf_weights
from bertdistill.bert.config import BertConfig
from bertdistill.bert.model import Bert, variable_shapes
from bertdistill.tokenization import Vocab, wordpiece_tokenizer
from tests.conftest import error_lines, run_cli

tf = pytest.importorskip("tensorflow")


def _batch(sentences: list[str], vocab: Vocab):
    encoded = wordpiece_tokenizer(vocab).encode_batch(sentences, add_special_tokens=False)
    L = max(len(e.ids) for e in encoded) + 2
    ids = np.zeros((len(sentences), L), np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encoded):
        row = [vocab.cls_id, *e.ids, vocab.sep_id]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask, np.zeros_like(ids)


def test_minilm_matches_transformers_within_1e4(sample, all_text):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = sample / "minilm"
    config = BertConfig.from_json_file(folder / "config.json")
    model = Bert(config)
    model.assign({k: v for k, v in read_hf_weights(folder / "model.safetensors").items()
                  if k in model.weights})
    sentences = [s for s in all_text.read_text(encoding="utf-8").splitlines() if len(s) > 40][:24]
    ids, mask, seg = _batch(sentences, Vocab(folder / "vocab.txt"))
    ours = model.encode(tf.constant(ids), tf.constant(mask), tf.constant(seg)).numpy()
    reference = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           token_type_ids=torch.tensor(seg, dtype=torch.long)).last_hidden_state.numpy()
    real = mask.astype(bool)
    assert real.sum() > 500
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 128, "type_vocab_size": 2,
        "initializer_range": 0.02}


def write_google_zip(path, sample, config: dict, shapes_from: dict | None = None, extra: dict | None = None,
                     skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A Google-format zip: bert_config.json, bert_model.ckpt.* written by tf.compat.v1 Saver, vocab.txt."""
    rng = np.random.default_rng(0)
    shapes = variable_shapes(BertConfig.from_dict(shapes_from or config))
    values = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items() if n not in skip}
    values.update(extra or {})
    ckpt_dir = path.parent / (path.stem + "_ckpt")
    ckpt_dir.mkdir()
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.get_variable(n, initializer=v) for n, v in values.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(ckpt_dir / "bert_model.ckpt"), write_meta_graph=False)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("uncased_L-2_H-32_A-4/bert_config.json", json.dumps(config))
        zf.write(sample / "vocab.txt", "uncased_L-2_H-32_A-4/vocab.txt")
        for f in ckpt_dir.iterdir():
            if f.name.startswith("bert_model.ckpt."):
                zf.write(f, f"uncased_L-2_H-32_A-4/{f.name}")
    return values


@pytest.mark.slow  # fetch-teacher as a process, TensorFlow imported by each
@pytest.mark.parametrize("source_act, meaning, hf_name", [("gelu", "gelu", "gelu"),
                                                           ("gelu_new", "gelu_tanh", "gelu_new")])
def test_the_activation_survives_a_saved_teacher_folder(tmp_path, sample, source_act, meaning, hf_name):
    """A Hugging Face "gelu" is the exact form; the folder fetch-teacher writes must say the same to the
    platform and to transformers (it once came back as the tanh form on the next read)."""
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("model.safetensors", "vocab.txt"):
        (source / name).symlink_to(sample / "minilm" / name)
    raw = json.loads((sample / "minilm" / "config.json").read_text()) | {"hidden_act": source_act}
    (source / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "teacher"
    blocker = tmp_path / "no-tf" / "tensorflow"  # a Hugging Face folder is read and checked without TensorFlow
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('fetch-teacher imported TensorFlow')\n")
    run_cli("fetch-teacher", "--source", str(source), "--output", str(out), check=True,
            env={"PYTHONPATH": f"{blocker.parent}:{os.environ.get('PYTHONPATH', '')}"})
    assert BertConfig.from_json_file(out / "bert_config.json").hidden_act == meaning
    assert transformers.BertConfig.from_json_file(out / "bert_config.json").hidden_act == hf_name
    config, _, _ = load_teacher(out, str(out), required_heads=())
    assert config.hidden_act == meaning


def test_weights_given_to_the_model_start_its_variables_and_the_rest_draw_as_before():
    """All given: nothing drawn, the values as given. Some given: the others as a model given none."""
    config = BertConfig.from_dict(TINY)
    fresh = Bert(config, seed=3).numpy_weights()
    rng = np.random.default_rng(0)
    given = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in fresh.items()}
    whole = Bert(config, seed=3, weights=given).numpy_weights()
    assert all(np.array_equal(whole[n], given[n]) for n in given)
    part = {n: v for n, v in given.items() if n.startswith("bert/encoder/")}
    mixed = Bert(config, seed=3, weights=part).numpy_weights()
    assert all(np.array_equal(mixed[n], part[n] if n in part else fresh[n]) for n in fresh)
    with pytest.raises(ValueError, match="shape"):
        Bert(config, weights={"bert/pooler/dense/bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="no such variable"):
        Bert(config, weights={"bert/encoder/layer_9/output/dense/bias": np.zeros(32, np.float32)})


@pytest.mark.slow  # fetch-teacher as a process, TensorFlow imported by each
def test_google_checkpoint_round_trip_is_exact(tmp_path, sample):
    slots = {"bert/embeddings/word_embeddings/adam_m": np.zeros((30522, 32), np.float32),
             "global_step": np.array(7, np.int64)}
    values = write_google_zip(tmp_path / "bert.zip", sample, TINY, extra=slots)
    out = tmp_path / "teacher"
    proc = run_cli("fetch-teacher", "--source", str(tmp_path / "bert.zip"), "--output", str(out), check=True)
    assert "google checkpoint" in proc.stdout and "heads: mlm, nsp, pooler" in proc.stdout
    config, weights, _ = load_teacher(out, str(out))
    assert config.hidden_act == "gelu_tanh"  # Google's "gelu" is the tanh approximation
    assert set(weights) == set(values) - set(slots)
    for name, value in weights.items():
        np.testing.assert_array_equal(value, values[name])
    model = Bert(config)
    model.assign(weights)
    assert model.parameter_count() == sum(v.size for v in weights.values())


@pytest.mark.slow  # fetch-teacher as a process, TensorFlow imported by each
@pytest.mark.parametrize("case, message", [
    ("no checkpoint", "no checkpoint found"),
    ("shapes", "has shape (30522, 32) but the config implies (30522, 48)"),
    ("missing", "lacks bert/encoder/layer_1/output/dense/kernel"),
    ("vocab size", "vocab.txt has 30522 pieces but the config says vocab_size 30000"),
    ("dotdot", "would write outside"),
    ("absolute", "would write outside"),
])
def test_bad_teacher_sources_are_refused_and_leave_nothing(tmp_path, sample, case, message):
    zpath = tmp_path / "bad.zip"
    if case == "no checkpoint":
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.writestr("m/bert_config.json", json.dumps(TINY))
            zf.write(sample / "vocab.txt", "m/vocab.txt")
    elif case == "shapes":
        write_google_zip(zpath, sample, {**TINY, "hidden_size": 48, "intermediate_size": 96}, shapes_from=TINY)
    elif case == "missing":
        write_google_zip(zpath, sample, TINY, skip=("bert/encoder/layer_1/output/dense/kernel",))
    elif case == "vocab size":
        write_google_zip(zpath, sample, {**TINY, "vocab_size": 30000}, shapes_from=TINY)
    else:
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.writestr("../escape.txt" if case == "dotdot" else "/etc/escape.txt", "x")
    out = tmp_path / "teacher"
    proc = run_cli("fetch-teacher", "--source", str(zpath), "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert message in line
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path.parent / "escape.txt").exists()


@pytest.mark.slow  # fetch-teacher as a process, TensorFlow imported by each
def test_a_link_in_the_archive_is_refused(tmp_path):
    zpath = tmp_path / "link.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        info = zipfile.ZipInfo("m/vocab.txt")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    proc = run_cli("fetch-teacher", "--source", str(zpath), "--output", str(tmp_path / "t"))
    assert proc.returncode == 2 and "is a link" in error_lines(proc)[0]


@pytest.mark.slow  # fetch-teacher as a process, TensorFlow imported by each
def test_missing_source_is_named(tmp_path):
    proc = run_cli("fetch-teacher", "--source", str(tmp_path / "nope.zip"), "--output", str(tmp_path / "t"))
    assert proc.returncode == 2 and "nope.zip does not exist" in error_lines(proc)[0]


def test_bfloat16_compute_trains_float32_variables_with_close_gradients():
    """distill's mixed precision on a GPU: bfloat16 matmuls, float32 variables; gradients stay close."""
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(0, 512, (4, 16)), tf.int32)
    ones, zeros = tf.ones_like(ids), tf.zeros_like(ids)
    positions = tf.constant(rng.integers(0, 16, (4, 3)), tf.int32)
    grads = {}
    for dtype in (tf.float32, tf.bfloat16):
        model = Bert(config, seed=3, compute_dtype=dtype)
        with tf.GradientTape() as tape:
            logits = model.mlm_logits(model.encode(ids, ones, zeros), positions)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ids[:, :3], logits))
        assert logits.dtype == tf.float32
        variables = list(model.weights.values())
        assert {v.dtype for v in variables} == {tf.float32}
        grads[dtype] = np.concatenate([tf.convert_to_tensor(g).numpy().ravel()
                                       for g in tape.gradient(loss, variables) if g is not None])
    full, half = grads[tf.float32], grads[tf.bfloat16]
    assert np.isfinite(half).all() and not np.array_equal(full, half)  # bfloat16 was really used
    cosine = float(full @ half / (np.linalg.norm(full) * np.linalg.norm(half)))
    assert cosine > 0.99


@pytest.mark.slow  # fetch-teacher as a process, TensorFlow imported by each
def test_a_vocab_over_15_bit_ids_is_refused_when_the_teacher_is_fetched(tmp_path):
    """The label cache stores ids in 15 bits: say so at fetch-teacher, not as a traceback mid-labelling."""
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "big-vocab"
    config = transformers.BertConfig(vocab_size=40000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertModel(config).save_pretrained(source)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (source / "vocab.txt").write_text("\n".join(special + [f"##p{i}" for i in range(40000 - 5)]) + "\n")
    proc = run_cli("fetch-teacher", "--source", str(source), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert error_lines(proc) == [f"error: fetch-teacher: {source}: its vocab has 40,000 pieces, but the label cache "
                                 "stores token ids in 15 bits (at most 32,768 pieces); use a teacher with a smaller "
                                 "vocab"]
    assert not (tmp_path / "out").exists()
