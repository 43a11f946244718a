"""The BERT encoder with its pretraining heads, as a tf.Module of plain tf.Variables.

Plain variables, named exactly as in Google's checkpoints (`bert/encoder/layer_3/...`),
rather than Keras layers: checkpoints of both published formats map onto one flat dict,
and `horovod.tensorflow.DistributedGradientTape` / `broadcast_variables` work on them
directly (under Keras 3, horovod's Keras optimizer silently skips the allreduce).

Heads: masked-LM (dense + activation + LayerNorm, decoder tied to the word embeddings,
output bias) and next-sentence (tanh pooler on [CLS] + a 2-way classifier). The masked-LM
head is applied only at the masked positions, so its 30k-word projection costs P rows per
sequence, not L.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from bertdistill.bert.config import BertConfig
from bertdistill.bert.variables import MLM_HEAD, NSP_HEAD, POOLER, initial_value, variable_shapes


class Bert(tf.Module):
    """`weights` (Google's names -> arrays) start the variables they name; the others start from
    Google's initialisation drawn from `seed`, the same values whether or not some are given. Given
    all of them (a teacher or student loaded to label, evaluate or publish), nothing is drawn: the
    draws for a 6-layer model cost about 0.8 CPU seconds, the variables themselves 0.1."""

    def __init__(self, config: BertConfig, seed: int = 0, compute_dtype: tf.DType = tf.float32,
                 weights: dict[str, np.ndarray] | None = None):
        super().__init__(name="bert")
        self.config = config
        self.compute_dtype = compute_dtype
        shapes = variable_shapes(config)
        given = weights or {}
        if unknown := sorted(set(given) - set(shapes)):
            raise ValueError(f"{', '.join(unknown[:3])}: no such variable in this config")
        rng = None if set(shapes) <= set(given) else np.random.default_rng(seed)

        def start(name: str, shape: tuple[int, ...]) -> np.ndarray:
            drawn = initial_value(name, shape, config, rng) if rng is not None else None
            if name not in given:
                return drawn
            if tuple(given[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(given[name].shape)}, the config implies {shape}")
            return np.asarray(given[name], np.float32)

        self.weights = {name: tf.Variable(start(name, shape), name=name.replace("/", "."))
                        for name, shape in shapes.items()}

    # -- building blocks -----------------------------------------------------------------
    def _w(self, name: str) -> tf.Tensor:
        v = self.weights[name]
        return tf.cast(v, self.compute_dtype) if self.compute_dtype != tf.float32 else v

    def _dense(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        return tf.matmul(x, self._w(prefix + "/kernel")) + self._w(prefix + "/bias")

    def _layer_norm(self, x: tf.Tensor, prefix: str) -> tf.Tensor:
        # Statistics in float32 even under mixed precision: variance of bf16 activations is too coarse.
        x32 = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x32, axes=[-1], keepdims=True)
        y = (x32 - mean) * tf.math.rsqrt(var + self.config.layer_norm_eps)
        y = y * self.weights[prefix + "/gamma"] + self.weights[prefix + "/beta"]
        return tf.cast(y, self.compute_dtype)

    def _act(self, x: tf.Tensor) -> tf.Tensor:
        if self.config.hidden_act == "relu":
            return tf.nn.relu(x)
        return tf.nn.gelu(x, approximate=self.config.hidden_act == "gelu_tanh")

    def _dropout(self, x: tf.Tensor, rate: float, training: bool, seed=None, salt: int = 0) -> tf.Tensor:
        """Stateless when a seed is given: the masks are a function of (seed, salt), so a resumed
        run draws the same masks as an uninterrupted one."""
        if not training or rate == 0:
            return x
        if seed is None:
            return tf.nn.dropout(x, rate)
        return tf.nn.experimental.stateless_dropout(x, rate, seed=seed + tf.constant([0, salt], seed.dtype))

    # -- the model -------------------------------------------------------------------------
    def encode(self, input_ids, input_mask, segment_ids, training: bool = False,
               num_layers: int | None = None, seed: tf.Tensor | None = None) -> tf.Tensor:
        """Last hidden states [B, L, H] (or those after the first `num_layers` layers).

        `seed` ([2] int64) makes dropout deterministic per call; training loops pass the step.
        """
        c = self.config
        shape = tf.shape(input_ids)
        B, L = shape[0], shape[1]
        x = (tf.gather(self._w("bert/embeddings/word_embeddings"), input_ids)
             + self._w("bert/embeddings/position_embeddings")[None, :L]
             + tf.gather(self._w("bert/embeddings/token_type_embeddings"), segment_ids))
        x = self._dropout(self._layer_norm(x, "bert/embeddings/LayerNorm"), c.hidden_dropout_prob, training, seed)
        mask = tf.cast(input_mask, self.compute_dtype)[:, None, None, :]
        bias = (1.0 - mask) * tf.constant(-10000.0, self.compute_dtype)
        heads, size = c.num_attention_heads, c.head_size
        scale = tf.constant(1.0 / math.sqrt(size), self.compute_dtype)
        x = tf.reshape(x, [B * L, c.hidden_size])

        def split(t):
            return tf.transpose(tf.reshape(t, [B, L, heads, size]), [0, 2, 1, 3])

        for i in range(num_layers if num_layers is not None else c.num_hidden_layers):
            p = f"bert/encoder/layer_{i}/"
            q = split(self._dense(x, p + "attention/self/query"))
            k = split(self._dense(x, p + "attention/self/key"))
            v = split(self._dense(x, p + "attention/self/value"))
            probs = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * scale + bias)
            probs = self._dropout(probs, c.attention_probs_dropout_prob, training, seed, 3 * i + 1)
            context = tf.reshape(tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3]), [B * L, c.hidden_size])
            attended = self._dropout(self._dense(context, p + "attention/output/dense"), c.hidden_dropout_prob,
                                     training, seed, 3 * i + 2)
            x = self._layer_norm(attended + x, p + "attention/output/LayerNorm")
            inner = self._act(self._dense(x, p + "intermediate/dense"))
            out = self._dropout(self._dense(inner, p + "output/dense"), c.hidden_dropout_prob, training, seed,
                                3 * i + 3)
            x = self._layer_norm(out + x, p + "output/LayerNorm")
        return tf.reshape(x, [B, L, c.hidden_size])

    def pooled(self, sequence: tf.Tensor) -> tf.Tensor:
        return tf.tanh(self._dense(sequence[:, 0], POOLER + "dense"))

    def mlm_logits(self, sequence: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
        """Masked-LM logits [B, P, V] at `positions` [B, P], in float32."""
        c = self.config
        gathered = tf.gather(sequence, positions, batch_dims=1)
        shape = tf.shape(positions)
        h = tf.reshape(gathered, [-1, c.hidden_size])
        h = self._layer_norm(self._act(self._dense(h, MLM_HEAD + "transform/dense")), MLM_HEAD + "transform/LayerNorm")
        logits = tf.matmul(h, self._w("bert/embeddings/word_embeddings"), transpose_b=True)
        logits = tf.cast(logits, tf.float32) + self.weights[MLM_HEAD + "output_bias"]
        return tf.reshape(logits, [shape[0], shape[1], c.vocab_size])

    def nsp_logits(self, sequence: tf.Tensor) -> tf.Tensor:
        pooled = self.pooled(sequence)
        logits = tf.matmul(pooled, self._w(NSP_HEAD + "output_weights"), transpose_b=True)
        return tf.cast(logits, tf.float32) + self.weights[NSP_HEAD + "output_bias"]

    def assign(self, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self.weights[name].assign(value)

    def numpy_weights(self) -> dict[str, np.ndarray]:
        return {name: v.numpy() for name, v in self.weights.items()}

    def parameter_count(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.weights.values()))
