"""The model's variables by Google's names, their shapes and initial values: numpy only.

Apart from model.py so that reading and checking a checkpoint (checkpoints.py: fetch-teacher,
the teachers' identity) never imports TensorFlow, whose import costs about 4 CPU seconds a process.
"""

from __future__ import annotations

import numpy as np

from bertdistill.bert.config import BertConfig

MLM_HEAD = "cls/predictions/"
NSP_HEAD = "cls/seq_relationship/"
POOLER = "bert/pooler/"


def variable_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every variable of the full pretraining model, Google's name -> shape."""
    H, inner, V = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert/embeddings/word_embeddings": (V, H),
        "bert/embeddings/position_embeddings": (config.max_position_embeddings, H),
        "bert/embeddings/token_type_embeddings": (config.type_vocab_size, H),
        "bert/embeddings/LayerNorm/gamma": (H,),
        "bert/embeddings/LayerNorm/beta": (H,),
    }
    for i in range(config.num_hidden_layers):
        p = f"bert/encoder/layer_{i}/"
        for part in ("query", "key", "value"):
            shapes[f"{p}attention/self/{part}/kernel"] = (H, H)
            shapes[f"{p}attention/self/{part}/bias"] = (H,)
        shapes.update({
            f"{p}attention/output/dense/kernel": (H, H), f"{p}attention/output/dense/bias": (H,),
            f"{p}attention/output/LayerNorm/gamma": (H,), f"{p}attention/output/LayerNorm/beta": (H,),
            f"{p}intermediate/dense/kernel": (H, inner), f"{p}intermediate/dense/bias": (inner,),
            f"{p}output/dense/kernel": (inner, H), f"{p}output/dense/bias": (H,),
            f"{p}output/LayerNorm/gamma": (H,), f"{p}output/LayerNorm/beta": (H,),
        })
    shapes.update({
        f"{POOLER}dense/kernel": (H, H), f"{POOLER}dense/bias": (H,),
        f"{MLM_HEAD}transform/dense/kernel": (H, H), f"{MLM_HEAD}transform/dense/bias": (H,),
        f"{MLM_HEAD}transform/LayerNorm/gamma": (H,), f"{MLM_HEAD}transform/LayerNorm/beta": (H,),
        f"{MLM_HEAD}output_bias": (V,),
        f"{NSP_HEAD}output_weights": (2, H), f"{NSP_HEAD}output_bias": (2,),
    })
    return shapes


def initial_value(name: str, shape: tuple[int, ...], config: BertConfig, rng: np.random.Generator) -> np.ndarray:
    """Google's initialisation: truncated normal for matrices, zeros for biases, ones for gammas."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "gamma":
        return np.ones(shape, np.float32)
    if leaf in ("beta", "bias", "output_bias"):
        return np.zeros(shape, np.float32)
    values = rng.normal(0.0, config.initializer_range, shape)
    limit = 2 * config.initializer_range
    while (bad := np.abs(values) > limit).any():
        values[bad] = rng.normal(0.0, config.initializer_range, int(bad.sum()))
    return values.astype(np.float32)
