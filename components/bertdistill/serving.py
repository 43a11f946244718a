"""Fill-mask serving: the registered student answers text with [MASK] in it.

publish logs this model (an MLflow pyfunc around the student's SavedModel, with its vocab and
this package's tokenizer) and registers it, so

    mlflow models serve -m "models:/bertdistill-student@champion" --env-manager local

answers `POST /invocations {"inputs": {"text": ["paris is the capital of [MASK]."]}, "params": {"top_k": 5}}`
with, per text, per [MASK], the top words and their probabilities. Why a pyfunc: the
SavedModel alone takes token ids, which a caller cannot make without this tokenizer.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

MASK = "[MASK]"
TOP_K = 5


def is_uncased(tokens: list[str]) -> bool:
    """An uncased vocab (bert-base-uncased, MiniLM) has no upper-case pieces besides [SPECIAL] ones."""
    return not any(t != t.lower() for t in tokens if not (t.startswith("[") and t.endswith("]")))


class FillMask(mlflow.pyfunc.PythonModel):
    """Text with one or more [MASK] -> the top_k words for each mask, most probable first."""

    def load_context(self, context) -> None:
        import tensorflow as tf

        from bertdistill.tokenization import Vocab, wordpiece_tokenizer

        self.vocab = Vocab(context.artifacts["vocab"])
        self.tokenizer = wordpiece_tokenizer(self.vocab, lowercase=is_uncased(self.vocab.tokens))
        self.model = tf.saved_model.load(context.artifacts["savedmodel"]).signatures["serving_default"]
        self.max_length = int((context.model_config or {}).get("max_length", 512))

    def encode(self, text: str) -> list[int]:
        """[CLS] pieces [SEP], with the mask id wherever the text says [MASK]."""
        if MASK not in text:
            raise ValueError(f"no {MASK} in {text[:80]!r}: put [MASK] where the model should fill in a word")
        ids = [self.vocab.cls_id]
        for i, part in enumerate(text.split(MASK)):
            if i:
                ids.append(self.vocab.mask_id)
            ids.extend(self.tokenizer.encode(part, add_special_tokens=False).ids)
        ids.append(self.vocab.sep_id)
        if len(ids) > self.max_length:
            raise ValueError(f"{text[:80]!r}... is {len(ids)} pieces; the model takes at most {self.max_length}")
        return ids

    def fill(self, text: str, top_k: int) -> dict[str, Any]:
        import numpy as np
        import tensorflow as tf

        ids = self.encode(text)
        batch = tf.constant([ids], tf.int32)
        logits = self.model(input_ids=batch, input_mask=tf.ones_like(batch),
                            segment_ids=tf.zeros_like(batch))["mlm_logits"].numpy()[0]
        masks = []
        for position in (i for i, t in enumerate(ids) if t == self.vocab.mask_id):
            row = logits[position] - logits[position].max()
            probs = np.exp(row) / np.exp(row).sum()
            best = np.argsort(-probs)[:top_k]
            masks.append([{"token": self.vocab.tokens[j], "probability": round(float(probs[j]), 6)} for j in best])
        return {"text": text, "masks": masks}

    def predict(self, context, model_input, params: dict | None = None) -> list[dict[str, Any]]:
        top_k = int((params or {}).get("top_k", TOP_K))
        return [self.fill(str(text), top_k) for text in _texts(model_input)]


def _texts(model_input) -> list[str]:
    """The texts of a request: a DataFrame's `text` column, a list of strings, or one string."""
    if hasattr(model_input, "columns"):
        if "text" not in model_input.columns:
            raise ValueError(f"the input has columns {list(model_input.columns)}; send a column named 'text'")
        return list(model_input["text"])
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


def log_fill_mask(savedmodel: str, vocab: str, registered_model_name: str, tf_version: str):
    """Log the fill-mask pyfunc in the active run and register it; returns MLflow's ModelInfo."""
    from pathlib import Path

    import tokenizers
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    import bertdistill

    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                               params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]))
    return mlflow.pyfunc.log_model(
        name="fill_mask", python_model=FillMask(), artifacts={"savedmodel": savedmodel, "vocab": vocab},
        code_paths=[str(Path(bertdistill.__file__).parent)], signature=signature,
        input_example={"text": [f"paris is the capital of {MASK}."]},
        pip_requirements=[f"tensorflow-cpu=={tf_version}", f"tokenizers=={tokenizers.__version__}",
                          f"mlflow=={mlflow.__version__}", "pandas"],
        registered_model_name=registered_model_name, await_registration_for=60)
