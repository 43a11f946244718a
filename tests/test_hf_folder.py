"""The Hugging Face folder the platform writes, against the readers no one here wrote: transformers'
BertForMaskedLM / BertForPreTraining / AutoTokenizer, and the platform's own reader for the round trip."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from bertdistill.bert.checkpoints import hf_to_google, load_teacher, read_hf_weights
from bertdistill.bert.config import BertConfig
from bertdistill.bert.hf_folder import google_to_hf, model_card, write_hf_folder
from bertdistill.bert.model import MLM_HEAD, NSP_HEAD, POOLER, Bert, initial_value, variable_shapes
from bertdistill.errors import StepError
from bertdistill.tokenization import Vocab, wordpiece_tokenizer

tf = pytest.importorskip("tensorflow")

TINY = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128)
CARD = "# A test model\n\nWritten by tests/test_hf_folder.py.\n"


def random_weights(config: BertConfig, seed: int = 0, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every variable, random (biases and LayerNorms too, so a swapped weight/bias pair would show)."""
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in variable_shapes(config).items()
            if not n.startswith(skip)}


def sentences(all_text, n: int, min_chars: int = 40) -> list[str]:
    lines = [s for s in all_text.read_text(encoding="utf-8").splitlines() if len(s) > min_chars]
    assert len(lines) >= n
    return lines[:n]


# -- the names -----------------------------------------------------------------------------------
def test_google_to_hf_is_the_exact_inverse_of_the_reader():
    weights = random_weights(TINY)
    written = google_to_hf(weights)
    assert len(written) == len(weights)
    assert "bert.encoder.layer.1.attention.self.query.weight" in written
    assert not any(k.startswith("cls.predictions.decoder") for k in written)  # tied: transformers leaves them out
    back = {}
    for name, value in written.items():
        assert value.dtype == np.float32 and value.flags.c_contiguous
        google, transpose = hf_to_google(name)
        back[google] = value.T if transpose else value
    assert back.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)
    # A Linear weight is [out, in]: the intermediate kernel [H, 4H] becomes [4H, H]; NSP's [2, H] stays.
    assert written["bert.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
    assert written["cls.seq_relationship.weight"].shape == (2, 32)


def test_a_name_bert_does_not_have_is_refused():
    with pytest.raises(StepError, match="bert/encoder/layer_0/adapter/kernel is not a variable of BERT"):
        google_to_hf({"bert/encoder/layer_0/adapter/kernel": np.zeros((2, 2), np.float32)})


# -- a. the round trip -----------------------------------------------------------------------------
def test_minilm_round_trips_bit_for_bit(tmp_path, sample):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    source = sample / "minilm"
    config = BertConfig.from_json_file(source / "config.json")
    weights = read_hf_weights(source / "model.safetensors")
    assert not any(n.startswith((MLM_HEAD, NSP_HEAD)) for n in weights)  # a sentence encoder: heads are fitted
    rng = np.random.default_rng(7)
    heads = {n: initial_value(n, s, config, rng) for n, s in variable_shapes(config).items() if n not in weights}
    assert len(heads) == 7 and all(n.startswith((MLM_HEAD, NSP_HEAD)) for n in heads)  # MiniLM has the pooler
    weights |= heads
    vocab = Vocab(source / "vocab.txt")
    out = tmp_path / "hf"
    write_hf_folder(out, config, weights, vocab, CARD)

    back = read_hf_weights(out / "model.safetensors")
    assert back.keys() == weights.keys()
    for name, value in weights.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    # The source file's own tensors, under the names BertModel gives them inside BertForPreTraining.
    original, written = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    used = [n for n in original if hf_to_google(n) is not None]
    assert len(used) == len(original) - 1 == 5 + 16 * config.num_hidden_layers + 2  # all but position_ids
    for name in used:
        np.testing.assert_array_equal(written[f"bert.{name}"], original[name], err_msg=name)
    assert "embeddings.position_ids" in original and not any("position_ids" in n for n in written)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(written)
    assert BertConfig.from_json_file(out / "config.json") == config
    assert (out / "vocab.txt").read_bytes() == (source / "vocab.txt").read_bytes()
    assert (out / "README.md").read_text(encoding="utf-8") == CARD
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    first = (out / "model.safetensors").read_bytes()
    write_hf_folder(out, config, weights, vocab, CARD)
    assert (out / "model.safetensors").read_bytes() == first  # the same model, the same bytes


# -- b. transformers loads it --------------------------------------------------------------------------
@pytest.mark.parametrize("act, hf_act", [("gelu", "gelu"), ("gelu_tanh", "gelu_new")])
def test_transformers_loads_the_folder_with_nothing_missing(tmp_path, sample, act, hf_act):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = replace(TINY, hidden_act=act)
    weights = random_weights(config)
    out = tmp_path / "hf"
    write_hf_folder(out, config, weights, Vocab(sample / "vocab.txt"), CARD, max_length=64)

    model, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert model.config.hidden_act == hf_act and model.config.layer_norm_eps == 1e-12
    assert model.config.architectures == ["BertForMaskedLM"] and model.config.pad_token_id == 0
    # The tied decoder is restored from the keys it is tied to.
    predictions = model.cls.predictions
    assert predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    np.testing.assert_array_equal(predictions.decoder.bias.detach().numpy(), weights[MLM_HEAD + "output_bias"])
    np.testing.assert_array_equal(model.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy(),
                                  weights["bert/encoder/layer_1/intermediate/dense/kernel"].T)

    model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set()
    # BertForMaskedLM is built without the pooler (add_pooling_layer=False) and without the next-sentence
    # head, and 5.24 declares no _keys_to_ignore_on_load_unexpected for them: it reports them as unexpected
    # and drops them, exactly as for Google's bert-base-uncased, whose checkpoint has both heads too.
    assert transformers.BertForMaskedLM._keys_to_ignore_on_load_unexpected is None
    assert info["unexpected_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                       "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    assert model.config.hidden_act == hf_act
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 64 and tokenizer.mask_token_id == 103
    with torch.no_grad():
        logits = model(**tokenizer("paris is the [MASK] of france.", return_tensors="pt")).logits
    assert logits.shape == (1, 9, 30522) and torch.isfinite(logits).all()


def test_without_pooler_and_nsp_masked_lm_loads_with_nothing_unexpected(tmp_path, sample):
    transformers = pytest.importorskip("transformers")
    weights = random_weights(TINY, skip=(POOLER, NSP_HEAD))
    write_hf_folder(tmp_path / "hf", TINY, weights, Vocab(sample / "vocab.txt"), CARD)
    _, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


# -- c. the same logits ----------------------------------------------------------------------------------
def pair_batch(texts: list[str], vocab: Vocab, rng: np.random.Generator):
    """[CLS] a [SEP] b [SEP] from consecutive sentences, segment ids 0/1, ~15% of the pieces [MASK]ed."""
    tokenizer = wordpiece_tokenizer(vocab)
    encoded = [e.ids[:40] for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    rows = []
    for a, b in zip(encoded[0::2], encoded[1::2], strict=True):
        a = [vocab.mask_id if rng.random() < 0.15 else t for t in a]
        rows.append(([vocab.cls_id, *a, vocab.sep_id, *b, vocab.sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1)))
    L = max(len(ids) for ids, _ in rows)
    ids, seg, mask = (np.zeros((len(rows), L), np.int32) for _ in range(3))
    for i, (row, segments) in enumerate(rows):
        ids[i, : len(row)], seg[i, : len(row)], mask[i, : len(row)] = row, segments, 1
    return ids, mask, seg


@pytest.mark.slow  # the tiny_student fixture runs the pipeline up to distill
def test_a_distilled_student_gives_the_same_logits_in_transformers(tmp_path, tiny_student, all_text):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    export = tiny_student / "export"
    config, weights, vocab = load_teacher(export, str(export))
    out = tmp_path / "hf"
    write_hf_folder(out, config, weights, vocab, CARD)

    ids, mask, seg = pair_batch(sentences(all_text, 48), vocab, np.random.default_rng(3))
    assert (ids == vocab.mask_id).sum() > 20 and seg.sum() > 100
    ours = Bert(config)
    ours.assign(weights)
    sequence = ours.encode(tf.constant(ids), tf.constant(mask), tf.constant(seg))
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    mlm = ours.mlm_logits(sequence, tf.constant(positions)).numpy()
    nsp = ours.nsp_logits(sequence).numpy()

    reference = transformers.BertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           token_type_ids=torch.tensor(seg, dtype=torch.long))
    real = mask.astype(bool)
    assert real.sum() > 1200
    assert np.abs(mlm[real] - theirs.prediction_logits.numpy()[real]).max() < 1e-4
    assert np.abs(nsp - theirs.seq_relationship_logits.numpy()).max() < 1e-4
    assert np.abs(mlm[real]).max() > 1  # real logits, not a degenerate head


# -- d. the same ids -----------------------------------------------------------------------------------
@pytest.mark.slow  # the all_text fixture extracts the sample dump
def test_auto_tokenizer_gives_the_platform_ids_on_real_text(tmp_path, sample, all_text):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    vocab = Vocab(sample / "vocab.txt")
    write_hf_folder(tmp_path / "hf", TINY, random_weights(TINY), vocab, CARD)
    texts = sentences(all_text, 50)
    platform = wordpiece_tokenizer(vocab).encode_batch(texts, add_special_tokens=False)
    expected = [[vocab.cls_id, *e.ids, vocab.sep_id] for e in platform]
    assert sum(len(e) for e in expected) > 1000 and any(vocab.tokens[i].startswith("##") for e in expected for i in e)

    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(auto).__name__ == "BertTokenizer" and auto.do_lower_case
    assert [auto(t)["input_ids"] for t in texts] == expected
    pair = auto(texts[0], texts[1])
    assert pair["input_ids"] == expected[0] + expected[1][1:]
    assert pair["token_type_ids"] == [0] * len(expected[0]) + [1] * (len(expected[1]) - 1)
    # tokenizer.json alone (the `tokenizers` library, no transformers) gives the same ids, padded as a batch.
    raw = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    batch = raw.encode_batch(texts[:5])
    longest = max(len(e) for e in expected[:5])
    assert [e.ids for e in batch] == [e + [vocab.pad_id] * (longest - len(e)) for e in expected[:5]]


def test_a_cased_vocab_keeps_case_and_accents(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "Café", "cafe", "##s", ".", "x"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    vocab = Vocab(tmp_path / "vocab.txt")
    config = replace(TINY, vocab_size=len(tokens))
    write_hf_folder(tmp_path / "hf", config, random_weights(config), vocab, CARD)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello hellos Café cafe."
    platform = wordpiece_tokenizer(vocab, lowercase=False).encode(text, add_special_tokens=False).ids
    assert platform == [5, 6, 9, 7, 8, 10]
    assert auto(text)["input_ids"] == [2, *platform, 3]


def test_transformers_cuts_words_at_100_characters_where_the_platform_cuts_at_200(tmp_path, sample):
    """Known and kept: transformers 5.24's BertTokenizer rebuilds WordPiece from tokenizer.json's vocab with
    its own max_input_chars_per_word=100, ignoring the file's 200 (Google's, the platform's). Only a word of
    101-200 characters differs. If this starts failing, transformers honours the file: drop the caveat."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    vocab = Vocab(sample / "vocab.txt")
    write_hf_folder(tmp_path / "hf", TINY, random_weights(TINY), vocab, CARD)
    text = "a " + "ab" * 75 + " b"
    platform = [vocab.cls_id, *wordpiece_tokenizer(vocab).encode(text, add_special_tokens=False).ids, vocab.sep_id]
    assert vocab.unk_id not in platform
    assert Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(text).ids == platform
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(text)["input_ids"] == [vocab.cls_id, platform[1], vocab.unk_id, platform[-2], vocab.sep_id]
    assert auto("a " + "ab" * 50 + " b")["input_ids"][1:-1] == wordpiece_tokenizer(vocab).encode(
        "a " + "ab" * 50 + " b", add_special_tokens=False).ids


# -- e. refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("no mlm head", "has no masked-LM head"),
    ("vocab size", "vocab.txt has 30522 pieces but the config says vocab_size 30000"),
    ("shape", "has shape (30522, 32) but the config implies (30522, 48)"),
    ("max_length", "max_length 512 is outside 2..128"),
])
def test_a_model_that_cannot_be_published_is_refused_and_leaves_nothing(tmp_path, sample, case, message):
    config, weights, max_length = TINY, random_weights(TINY), None
    if case == "no mlm head":
        weights = random_weights(TINY, skip=(MLM_HEAD,))
    elif case == "vocab size":
        config = replace(TINY, vocab_size=30000)
    elif case == "shape":
        config = replace(TINY, hidden_size=48)
    else:
        max_length = 512
    out = tmp_path / "a" / "hf"
    with pytest.raises(StepError, match=re.escape(message)):
        write_hf_folder(out, config, weights, Vocab(sample / "vocab.txt"), CARD, max_length=max_length)
    assert not (tmp_path / "a").exists()


# -- the card's front matter ---------------------------------------------------------------------------------
def test_model_card_front_matter_reads_back_as_yaml():
    yaml = pytest.importorskip("yaml")
    front = {"license": "apache-2.0", "language": ["en"], "tags": ["bert", "fill-mask", "yes", "1.0"],
             "pipeline_tag": "fill-mask", "base_model": "nreimers/MiniLM-L6-H384-uncased", "eps": 1e-12,
             "big": 1e20, "steps": 6, "public": False, "note": "a: b # not a comment", "none": None, "empty": [],
             "model-index": [{"name": "student", "results": [{"task": {"type": "fill-mask"},
                                                              "metrics": [{"type": "accuracy", "value": 0.5}]}]}]}
    card = model_card(front, "# Student\n\nText.\n")
    head, sep, body = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep and body == "\n# Student\n\nText.\n"
    assert yaml.safe_load(head) == front
    assert "license: apache-2.0\n" in card and "- fill-mask\n" in card
