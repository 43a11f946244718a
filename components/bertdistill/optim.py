"""AdamW with warm-up then linear decay, over plain tf.Variables.

Written against plain tf.Variables (not a Keras optimizer) so the same update runs under
horovod.tensorflow's DistributedGradientTape, and so a checkpoint is just arrays: the
variables, the moment estimates and the step.
"""

from __future__ import annotations

import tensorflow as tf

NO_DECAY = ("LayerNorm", "/bias", "output_bias")


def learning_rate(step: tf.Tensor, peak: float, warmup: int, total: int) -> tf.Tensor:
    """The rate of update `step` (from 1): up to `peak` in `warmup` equal steps, then linearly down to 0
    at `total`. Only a warm-up shorter than the run leaves it any decay, so the steps size it from
    their own step count (their `warmup()`), not as a fixed number of steps."""
    step = tf.cast(step, tf.float32)
    warm = step / max(warmup, 1)
    decay = tf.maximum(0.0, (total - step) / max(total - warmup, 1))
    return peak * tf.minimum(warm, decay)


class AdamW(tf.Module):
    def __init__(self, variables: dict[str, tf.Variable], peak_lr: float, warmup: int, total: int,
                 weight_decay: float = 0.01, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                 clip_norm: float = 1.0):
        super().__init__(name="adamw")
        self.names = list(variables)
        self.variables_ = [variables[n] for n in self.names]
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables_]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables_]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.decays = [not any(part in n for part in NO_DECAY) for n in self.names]
        self.peak_lr, self.warmup, self.total = peak_lr, warmup, total
        self.weight_decay, self.beta1, self.beta2, self.eps, self.clip_norm = weight_decay, beta1, beta2, eps, clip_norm

    def apply(self, grads: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """One update; returns (learning rate, gradient norm before clipping)."""
        grads = [tf.convert_to_tensor(g) for g in grads]
        grads, norm = tf.clip_by_global_norm(grads, self.clip_norm)
        self.step.assign_add(1)
        t = tf.cast(self.step, tf.float32)
        lr = learning_rate(self.step, self.peak_lr, self.warmup, self.total)
        correction = tf.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        for g, var, m, v, decays in zip(grads, self.variables_, self.m, self.v, self.decays, strict=True):
            m.assign(self.beta1 * m + (1.0 - self.beta1) * g)
            v.assign(self.beta2 * v + (1.0 - self.beta2) * tf.square(g))
            update = correction * m / (tf.sqrt(v) + self.eps)
            if decays:
                update += self.weight_decay * var
            var.assign_sub(lr * update)
        return lr, norm
