"""BertConfig: one flat dataclass read from Google's bert_config.json or Hugging Face's config.json.

The two formats share most keys. Two meanings differ and are settled here: Google's code
computes "gelu" with the tanh approximation while Hugging Face's "gelu" is the exact erf
form, and Google fixes LayerNorm epsilon at 1e-12 where Hugging Face reads layer_norm_eps.

The platform writes its own configs in Hugging Face's convention, saying so with
`"model_type": "bert"` and naming the tanh form "gelu_new": an unmarked "gelu" is read as
Google's, so a file that did not say whose it was turned an exact-GELU teacher into a tanh
one on the next read. transformers reads the same file to the same activation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from bertdistill.errors import StepError

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
# A teacher or student folder: these three files (named here, away from the model, so the data
# steps that only check a folder never import TensorFlow).
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "bert_config.json", "vocab.txt"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact (erf) GELU; "gelu_tanh" is Google's approximation
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise StepError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                            f"{self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise StepError(f"hidden_act {self.hidden_act!r} is not supported (use one of {ACTIVATIONS})")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> BertConfig:
        """Google's or Hugging Face's keys; unknown keys are ignored, missing required ones refused."""
        if raw.get("model_type", "bert") != "bert":
            raise StepError(f"{source}: model_type {raw['model_type']!r} is not a BERT model")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "vocab_size" not in values:
            raise StepError(f"{source}: no vocab_size; is this a BERT config.json / bert_config.json?")
        is_hf = "model_type" in raw or "architectures" in raw
        act = values.get("hidden_act", "gelu")
        if act == "gelu" and not is_hf:
            values["hidden_act"] = "gelu_tanh"  # what Google's modeling.py computes for "gelu"
        elif act in ("gelu_new", "gelu_pytorch_tanh"):
            values["hidden_act"] = "gelu_tanh"
        return cls(**values)

    @classmethod
    def from_json_file(cls, path, source: str | None = None) -> BertConfig:
        source = source or str(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise StepError(f"{source}: cannot read the model config ({exc})") from None
        return cls.from_dict(raw, source)

    def to_json(self) -> str:
        """Hugging Face's keys and activation names, marked as such by model_type."""
        values = asdict(self) | {"model_type": "bert", "hidden_act": _HF_NAMES[self.hidden_act]}
        return json.dumps(values, indent=2, sort_keys=True) + "\n"


_HF_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
