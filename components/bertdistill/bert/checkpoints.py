"""Checkpoints: Google's TF1 format, Hugging Face folders, and the platform's teacher layout.

Every loader ends in `checked_weights`, which refuses a missing or mis-shaped variable by
name: the seed silently labelled with a random teacher when its checkpoint flag was left
out, and that must never happen again. Heads are optional only where the caller says so
(a sentence encoder such as MiniLM has no masked-LM head until adapt-teacher fits one).

The platform layout of a teacher folder: bert_config.json (BertConfig), vocab.txt and
model.safetensors holding float32 arrays under Google's variable names, plus the folder's
_MANIFEST.json. safetensors needs neither TensorFlow nor pickle to read, and its bytes hash
to the teacher's identity.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bertdistill.bert.config import CONFIG, VOCAB, WEIGHTS, BertConfig
from bertdistill.bert.variables import MLM_HEAD, NSP_HEAD, POOLER, variable_shapes
from bertdistill.errors import StepError
from bertdistill.tokenization import Vocab

HEADS = {"mlm": MLM_HEAD, "nsp": NSP_HEAD, "pooler": POOLER}


def heads_present(arrays: dict[str, np.ndarray]) -> list[str]:
    return [head for head, prefix in HEADS.items() if any(k.startswith(prefix) for k in arrays)]


def checked_weights(arrays: dict[str, np.ndarray], config: BertConfig, source: str,
                    required_heads: tuple[str, ...] = ("mlm", "nsp", "pooler")) -> dict[str, np.ndarray]:
    """The arrays the model needs, float32, after checking every name and shape."""
    expected = variable_shapes(config)
    present = set(heads_present(arrays))
    wanted = {n: s for n, s in expected.items()
              if not any(n.startswith(HEADS[h]) for h in HEADS if h not in required_heads and h not in present)}
    missing = sorted(n for n in wanted if n not in arrays)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise StepError(f"{source}: the checkpoint lacks {shown}; it does not match its config "
                        f"({config.num_hidden_layers} layers, hidden {config.hidden_size}) or is incomplete")
    for name, shape in wanted.items():
        if tuple(arrays[name].shape) != shape:
            raise StepError(f"{source}: {name} has shape {tuple(arrays[name].shape)} but the config implies "
                            f"{shape}: the config does not belong to this checkpoint")
    return {n: np.asarray(arrays[n], dtype=np.float32) for n in wanted}


def check_vocab(vocab: Vocab, config: BertConfig, source: str) -> None:
    if len(vocab) != config.vocab_size:
        raise StepError(f"{source}: vocab.txt has {len(vocab)} pieces but the config says vocab_size "
                        f"{config.vocab_size}: they belong to different models")


# -- Google TF1 checkpoints ------------------------------------------------------------
def read_google_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """Variables of bert_model.ckpt (the .index/.data files' common prefix); optimizer slots dropped."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as exc:
        raise StepError(f"{prefix}: not a readable TensorFlow checkpoint ({str(exc).splitlines()[0]})") from None
    names = reader.get_variable_to_shape_map()
    return {n: reader.get_tensor(n) for n in names
            if n.startswith(("bert/", "cls/")) and not n.endswith(("adam_m", "adam_v"))}


# -- Hugging Face -------------------------------------------------------------------------
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_PARTS = {
    "attention.self.query": "attention/self/query", "attention.self.key": "attention/self/key",
    "attention.self.value": "attention/self/value", "attention.output.dense": "attention/output/dense",
    "attention.output.LayerNorm": "attention/output/LayerNorm", "intermediate.dense": "intermediate/dense",
    "output.dense": "output/dense", "output.LayerNorm": "output/LayerNorm",
}
_HF_TOP = {
    "embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
    "embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
    "embeddings.token_type_embeddings.weight": "bert/embeddings/token_type_embeddings",
    "cls.predictions.bias": f"{MLM_HEAD}output_bias",
    "cls.predictions.decoder.bias": f"{MLM_HEAD}output_bias",
    "cls.seq_relationship.weight": f"{NSP_HEAD}output_weights",
    "cls.seq_relationship.bias": f"{NSP_HEAD}output_bias",
}
_LEAF = {"weight": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta"}


def hf_to_google(name: str) -> tuple[str, bool] | None:
    """(Google name, transpose?) for a Hugging Face BERT tensor name; None for tensors BERT ignores."""
    name = name.removeprefix("bert.")
    if name in _HF_TOP:
        return _HF_TOP[name], False
    stem, _, leaf = name.rpartition(".")
    if stem.endswith("LayerNorm"):
        leaf = {"weight": "gamma", "bias": "beta"}.get(leaf, leaf)
        if stem == "embeddings.LayerNorm":
            return f"bert/embeddings/LayerNorm/{leaf}", False
        if stem == "cls.predictions.transform.LayerNorm":
            return f"{MLM_HEAD}transform/LayerNorm/{leaf}", False
    if leaf not in _LEAF:
        return None
    if stem == "pooler.dense":
        return f"{POOLER}dense/{_LEAF[leaf]}", leaf == "weight"
    if stem == "cls.predictions.transform.dense":
        return f"{MLM_HEAD}transform/dense/{_LEAF[leaf]}", leaf == "weight"
    match = _HF_LAYER.match(stem)
    if match and match.group(2) in _HF_PARTS:
        target = f"bert/encoder/layer_{match.group(1)}/{_HF_PARTS[match.group(2)]}/{_LEAF[leaf]}"
        return target, leaf == "weight" and not match.group(2).endswith("LayerNorm")
    return None


def _load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise StepError(f"{path}: not a readable safetensors file ({exc})") from None


def read_safetensors_weights(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """(arrays under Google's names, "platform" or "huggingface") of a model.safetensors in either naming:
    a teacher folder of this platform made elsewhere (Google's names already) is brought in by
    fetch-teacher like a Hugging Face folder, since readers take only a teacher fetch-teacher committed."""
    tensors = _load_safetensors(path)
    if any(name.startswith(("bert/", "cls/")) for name in tensors):
        return tensors, "platform"
    return _hf_to_google_names(tensors), "huggingface"


def read_hf_weights(path: str | Path) -> dict[str, np.ndarray]:
    return _hf_to_google_names(_load_safetensors(path))


def _hf_to_google_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        mapped = hf_to_google(name)
        if mapped is not None:
            target, transpose = mapped
            out[target] = value.T if transpose else value
    return out


# -- the platform layout --------------------------------------------------------------------
def save_teacher(folder: Path, config: BertConfig, weights: dict[str, np.ndarray], vocab_path: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(config.to_json(), encoding="utf-8")
    (folder / VOCAB).write_bytes(Path(vocab_path).read_bytes())
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(weights.items())},
              str(folder / WEIGHTS))


def load_teacher(folder: Path, source: str, required_heads: tuple[str, ...] = ("mlm", "nsp", "pooler")):
    """(config, checked weights, vocab) from a teacher folder staged locally."""
    from safetensors.numpy import load_file

    for name in (CONFIG, VOCAB, WEIGHTS):
        if not (folder / name).is_file():
            raise StepError(f"{source}: no {name}; is this a teacher folder made by fetch-teacher?")
    config = BertConfig.from_json_file(folder / CONFIG, f"{source}/{CONFIG}")
    vocab = Vocab(folder / VOCAB, f"{source}/{VOCAB}")
    check_vocab(vocab, config, source)
    arrays = load_file(str(folder / WEIGHTS))
    if "mlm" in required_heads and "mlm" not in heads_present(arrays):
        raise StepError(f"{source}: the teacher has no masked-LM head; run adapt-teacher on it first")
    return config, checked_weights(arrays, config, source, required_heads), vocab
