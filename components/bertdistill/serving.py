"""Fill-mask serving: the registered student answers text with [MASK] in it.

publish logs this model (an MLflow pyfunc around the student's SavedModel, with its vocab and
this package's tokenizer) and registers it, so

    mlflow models serve -m "models:/bertdistill-student@champion" --env-manager local

answers `POST /invocations {"inputs": {"text": ["paris is the capital of [MASK]."]}, "params": {"top_k": 5}}`
with, per text, per [MASK], the top words and their probabilities. Why a pyfunc: the
exported models take token ids, which a caller cannot make without this tokenizer.

It runs the student's ONNX export under ONNX Runtime (no TensorFlow in the serving environment),
int8 or fp32 as evaluate's report chose, and computes the masked-LM head at the [MASK] positions
only. The model's artifacts also carry the other precision and the Hugging Face folder, so a
registry version holds every form the student is published in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MASK = "[MASK]"
TOP_K = 5
REQUEST = '{"inputs": {"text": ["paris is the capital of [MASK]."]}, "params": {"top_k": 5}}'


class BadRequest(MlflowException):
    """A request the model cannot answer, said so that its sender can fix it: HTTP 400, no stack trace.

    Why an MlflowException: MLflow's scoring server answers one with its error code's HTTP status
    (INVALID_PARAMETER_VALUE: 400) and `serialize_as_json()` as the body, which holds no stack
    trace unless one was passed in. Any other exception from predict becomes a generic "unexpected
    error" 400 whose body carries the server's whole traceback. The server also rewrites the
    message to "Failed to predict data '<the whole input>'. Error: ..."; the body keeps only ours.
    """

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        return json.dumps({**json.loads(super().serialize_as_json()), "message": self.reason})


class FillMask(mlflow.pyfunc.PythonModel):
    """Text with one or more [MASK] -> the top_k words for each mask, most probable first."""

    def load_context(self, context) -> None:
        from bertdistill.onnx_model import session
        from bertdistill.tokenization import Vocab, is_uncased, wordpiece_tokenizer

        config = context.model_config or {}
        self.vocab = Vocab(context.artifacts["vocab"])
        self.tokenizer = wordpiece_tokenizer(self.vocab, lowercase=is_uncased(self.vocab.tokens))
        self.precision = config.get("precision", "int8")
        self.model = session(context.artifacts[f"onnx_{self.precision}"])
        self.max_length = int(config.get("max_length", 512))

    def encode(self, text: str | None, number: int = 1) -> list[int]:
        """[CLS] pieces [SEP], with the mask id wherever the text says [MASK]; `number` (from 1) names
        the text in a refusal."""
        if text is None or not text.strip():
            raise BadRequest(f"text {number} is empty: send a sentence with {MASK} where the model should fill in "
                             f"a word, e.g. {REQUEST}")
        if MASK not in text:
            raise BadRequest(f"text {number} has no {MASK} ({_excerpt(text)}): put {MASK} where the model should "
                             "fill in a word")
        ids = [self.vocab.cls_id]
        for i, part in enumerate(text.split(MASK)):
            if i:
                ids.append(self.vocab.mask_id)
            ids.extend(self.tokenizer.encode(part, add_special_tokens=False).ids)
        ids.append(self.vocab.sep_id)
        if len(ids) > self.max_length:
            raise BadRequest(f"text {number} ({_excerpt(text)}) is {len(ids)} word pieces with [CLS] and [SEP]; the "
                             f"model takes at most {self.max_length}: shorten it around its {MASK}")
        return ids

    def fill(self, text: str, top_k: int, ids: list[int] | None = None) -> dict[str, Any]:
        import numpy as np

        from bertdistill.onnx_model import feeds

        ids = ids if ids is not None else self.encode(text)
        batch = np.array([ids])
        positions = [i for i, t in enumerate(ids) if t == self.vocab.mask_id]
        logits = self.model.run(["mlm_logits"], feeds(batch, np.ones_like(batch), np.zeros_like(batch),
                                                      np.array([positions])))[0][0]
        masks = []
        for row in logits:
            row = row - row.max()
            probs = np.exp(row) / np.exp(row).sum()
            best = np.argsort(-probs)[:top_k]
            masks.append([{"token": self.vocab.tokens[j], "probability": round(float(probs[j]), 6)} for j in best])
        return {"text": text, "masks": masks}

    def predict(self, context, model_input, params: dict | None = None) -> list[dict[str, Any]]:
        top_k = _top_k((params or {}).get("top_k", TOP_K), len(self.vocab.tokens))
        texts = _texts(model_input)
        ids = [self.encode(text, number) for number, text in enumerate(texts, 1)]  # refuse before any work
        return [self.fill(text, top_k, text_ids) for text, text_ids in zip(texts, ids, strict=True)]


def _excerpt(text: str) -> str:
    """The start of a text, quoted, short enough for a one-line refusal."""
    return repr(text[:60] + "...") if len(text) > 60 else repr(text)


def _top_k(value: object, vocab_size: int) -> int:
    """The params' top_k as a count of words per mask, from 1 to the vocab's size."""
    try:
        top_k = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        top_k = 0
    if top_k < 1 or top_k > vocab_size or top_k != value:
        raise BadRequest(f"top_k {value!r} is not a whole number from 1 to {vocab_size}: send how many words to "
                         'list per [MASK], e.g. "params": {"top_k": 5}')
    return top_k


def _texts(model_input) -> list[str | None]:
    """The texts of a request: a DataFrame's `text` column, a list of strings, or one string."""
    if hasattr(model_input, "columns"):
        if "text" not in model_input.columns:  # MLflow dropped any other columns: the signature has none
            raise BadRequest(f"the request has no texts: send them as a column named text, e.g. {REQUEST}")
        model_input = model_input["text"]
    elif isinstance(model_input, str):
        model_input = [model_input]
    return [_text(value) for value in model_input]


def _text(value: object) -> str | None:
    """A text as a string; None for a missing one (JSON null, a DataFrame's NaN), which encode refuses."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value if isinstance(value, str) else str(value)


def log_fill_mask(published: Path, vocab: Path, registered_model_name: str, onnx: dict):
    """Log the fill-mask pyfunc in the active run and register it; returns MLflow's ModelInfo.

    `published` is publish's staging folder (huggingface/, onnx/); `onnx` evaluate's figures on the
    exports, whose `serves` picks the precision served."""
    import numpy
    import onnxruntime
    import tokenizers
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    import bertdistill
    from bertdistill.onnx_model import FP32, INT8

    # `text` is optional to MLflow only so that a request without it reaches predict, which refuses it
    # in words (a required column is refused by MLflow first, echoing the input over several lines).
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text", required=False)]),
                               params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]))
    onnx_dir = published / "onnx"
    return mlflow.pyfunc.log_model(
        name="fill_mask", python_model=FillMask(),
        artifacts={"onnx_fp32": str(onnx_dir / FP32), "onnx_int8": str(onnx_dir / INT8), "vocab": str(vocab),
                   "huggingface": str(published / "huggingface")},
        model_config={"precision": onnx["serves"]},
        metadata={"serving": f"onnx {onnx['serves']}", "onnx_int8_minus_fp32_points": onnx["int8_minus_fp32_points"]},
        code_paths=[str(Path(bertdistill.__file__).parent)], signature=signature,
        input_example={"text": [f"paris is the capital of {MASK}."]},
        pip_requirements=[f"onnxruntime=={onnxruntime.__version__}", f"tokenizers=={tokenizers.__version__}",
                          f"numpy=={numpy.__version__}", f"mlflow=={mlflow.__version__}", "pandas"],
        registered_model_name=registered_model_name, await_registration_for=60)
