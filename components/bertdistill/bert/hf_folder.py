"""A Hugging Face `transformers` folder written from the platform's own weights: the inverse of the reader.

checkpoints.read_hf_weights maps a Hugging Face BERT onto Google's variable names; this module maps
them back, so a distilled student can be published where people look for models and loaded with
`BertForMaskedLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)` and nothing
of ours. It needs numpy and safetensors only, never torch: the arrays are the platform's float32
arrays, renamed and (for dense kernels) transposed, bit for bit.

What transformers 5.24 expects, checked against its BertForMaskedLM / BertForPreTraining: the
masked-LM decoder is tied (`_tied_weights_keys`) to the word embeddings (decoder.weight) and to
`cls.predictions.bias` (decoder.bias), and its own save_pretrained leaves both decoder keys out;
so does this writer, and the two are restored by tying when the folder is loaded.

The tokenizer files give the platform's ids: tokenizer.json is the platform's own WordPiece
tokenizer with BERT's [CLS]/[SEP] template, and tokenizer_config.json names the same lower-casing.
One difference stays, and it is transformers': its BertTokenizer rebuilds the WordPiece model from
tokenizer.json's vocabulary with its own limit of 100 characters a word (Google's is 200, which
the platform keeps), so a 101-200 character word is [UNK] under AutoTokenizer and pieces here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from bertdistill.bert.checkpoints import check_vocab, checked_weights, heads_present, hf_to_google
from bertdistill.bert.config import BertConfig
from bertdistill.errors import StepError
from bertdistill.tokenization import SPECIAL_TOKENS, Vocab, is_uncased, wordpiece_tokenizer

HF_WEIGHTS, HF_CONFIG, HF_VOCAB = "model.safetensors", "config.json", "vocab.txt"
TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CARD = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md")
# Google names without a per-layer stem: the embedding tables and the heads' bare arrays.
_GOOGLE_TOP = {
    "bert/embeddings/word_embeddings": "bert.embeddings.word_embeddings.weight",
    "bert/embeddings/position_embeddings": "bert.embeddings.position_embeddings.weight",
    "bert/embeddings/token_type_embeddings": "bert.embeddings.token_type_embeddings.weight",
    "cls/predictions/output_bias": "cls.predictions.bias",
    "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",  # [2, H] in both layouts
    "cls/seq_relationship/output_bias": "cls.seq_relationship.bias",
}
_LEAF = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_SPECIAL_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")  # SPECIAL_TOKENS' order


# -- weights ------------------------------------------------------------------------------------
def hf_name(google: str) -> tuple[str, bool]:
    """(Hugging Face name, transpose?) of a Google variable name: a dense kernel is [in, out] in Google's
    layout and a torch Linear weight [out, in].

    The answer is checked against checkpoints.hf_to_google, so the writer can never drift from the
    reader: a name the reader would not map back to itself is refused rather than written.
    """
    if google in _GOOGLE_TOP:
        name, transpose = _GOOGLE_TOP[google], False
    else:
        stem, _, leaf = google.rpartition("/")
        dotted = re.sub(r"layer_(\d+)", r"layer.\1", stem).replace("/", ".")
        name, transpose = f"{dotted}.{_LEAF.get(leaf, leaf)}", leaf == "kernel"
    if hf_to_google(name) != (google, transpose):
        raise StepError(f"{google} is not a variable of BERT or its pretraining heads; "
                        "there is no Hugging Face name to write it under")
    return name, transpose


def google_to_hf(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The platform's (Google-named) arrays under BertForPreTraining's names, contiguous float32.

    The exact inverse of read_hf_weights' mapping: names map back one to one and a transpose is
    undone by a transpose, so no value changes. The tied decoder keys are left out, as
    transformers' own save_pretrained does.
    """
    out = {}
    for google, value in weights.items():
        name, transpose = hf_name(google)
        array = np.asarray(value, dtype=np.float32)
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


# -- the folder ---------------------------------------------------------------------------------
def hf_config(config: BertConfig, pad_id: int) -> dict:
    """config.json: every BertConfig field in Hugging Face's names (BertConfig.to_json already says
    "gelu" for the exact form and "gelu_new" for tanh), plus what transformers reads beside them."""
    return json.loads(config.to_json()) | {
        "architectures": ["BertForMaskedLM"],
        "pad_token_id": pad_id,
        "tie_word_embeddings": True,  # the decoder is the word embeddings: its keys are not in the file
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }


def tokenizer_config(vocab: Vocab, lowercase: bool, max_length: int) -> dict:
    """tokenizer_config.json: the class, its lower-casing (accents follow it, as in Google's code) and
    the special tokens."""
    return {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "strip_accents": None,
            "tokenize_chinese_chars": True, "model_max_length": max_length,
            "clean_up_tokenization_spaces": True, **special_tokens_map(vocab)}


def special_tokens_map(vocab: Vocab) -> dict[str, str]:
    return {key: vocab.tokens[i] for key, i in zip(_SPECIAL_KEYS, _special_ids(vocab), strict=True)}


def _special_ids(vocab: Vocab) -> tuple[int, ...]:
    return vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id


def hf_tokenizer_json(vocab: Vocab, lowercase: bool) -> str:
    """The platform's WordPiece tokenizer with what a Hugging Face tokenizer.json adds: the special
    tokens kept whole when they appear in text ("[MASK]" for fill-mask), BERT's [CLS] A [SEP] B [SEP]
    template with segment ids, padding with [PAD], and the '##' decoder."""
    from tokenizers import AddedToken, decoders, processors

    tokenizer = wordpiece_tokenizer(vocab, lowercase)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    cls, sep = "[CLS]", "[SEP]"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab.cls_id), (sep, vocab.sep_id)])
    tokenizer.enable_padding(pad_id=vocab.pad_id, pad_token="[PAD]")
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer.to_str(pretty=True)


def write_hf_folder(folder: Path, config: BertConfig, weights: dict[str, np.ndarray], vocab: Vocab, card: str,
                    max_length: int | None = None) -> None:
    """A folder `BertForMaskedLM.from_pretrained` and `AutoTokenizer.from_pretrained` load as they are.

    Everything is checked before the folder is made (a refused model leaves nothing behind), and
    each file is written under a temporary name and renamed, so no file is ever half written.
    `max_length` is the longest input the model was trained on; the position table's size if not given.
    """
    folder = Path(folder)
    arrays = _checked(folder, config, weights, vocab)
    max_length = max_length or config.max_position_embeddings
    if not 2 <= max_length <= config.max_position_embeddings:
        raise StepError(f"{folder}: max_length {max_length} is outside 2..{config.max_position_embeddings}, "
                        "the inputs the model's position table allows")
    lowercase = is_uncased(vocab.tokens)
    tensors = dict(sorted(google_to_hf(arrays).items()))
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / HF_WEIGHTS, tensors)
    _write_json(folder / HF_CONFIG, hf_config(config, vocab.pad_id))
    _write_bytes(folder / HF_VOCAB, vocab.path.read_bytes())
    _write_json(folder / TOKENIZER_CONFIG, tokenizer_config(vocab, lowercase, max_length))
    _write_json(folder / SPECIAL_TOKENS_MAP, special_tokens_map(vocab))
    _write_bytes(folder / TOKENIZER, hf_tokenizer_json(vocab, lowercase).encode("utf-8"))
    _write_bytes(folder / CARD, card.encode("utf-8"))


def _checked(folder: Path, config: BertConfig, weights: dict[str, np.ndarray], vocab: Vocab) -> dict[str, np.ndarray]:
    """The arrays to write: the masked-LM head is required (the folder is a fill-mask model), the
    pooler and next-sentence head are written when present; names and shapes checked against the config."""
    if "mlm" not in heads_present(weights):
        raise StepError(f"{folder}: the model has no masked-LM head, so it cannot be published as a "
                        "fill-mask model; run adapt-teacher on it first")
    check_vocab(vocab, config, str(folder))
    return checked_weights(weights, config, str(folder), required_heads=("mlm",))


def _write_atomically(path: Path, write) -> None:
    """`write(temporary path)`, then rename over `path`: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes(path: Path, data: bytes) -> None:
    _write_atomically(path, lambda tmp: tmp.write_bytes(data))


def _write_json(path: Path, value: dict) -> None:
    _write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """metadata format "pt": transformers' loader asks for it (the arrays are plain float32 either way)."""
    from safetensors.numpy import save_file

    _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


# -- the model card -----------------------------------------------------------------------------
def model_card(front_matter: dict, body: str) -> str:
    """README.md for the Hub: YAML front matter between '---' lines, then the markdown body.
    PyYAML comes with MLflow's client, which every model step has."""
    import yaml

    return f"---\n{yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True)}---\n\n{body.lstrip()}"
