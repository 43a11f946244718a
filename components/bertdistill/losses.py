"""Distillation losses over the cached teacher labels.

The cache holds, per masked position, the teacher's top-k probabilities at temperature 1
and the mass outside them. The soft loss is the KL divergence from the teacher to the
student over the partition {each top-k word, everything else}: exact for the top k, and
with k equal to the vocab size it is the full KL (a test checks this).

Temperature. Tempering needs the whole distribution, which the cache does not hold. The
top-k probabilities are tempered exactly (p ** (1/T), renormalised); the rest mass is
treated as spread evenly over the V - k other words, so its tempered mass is
(V - k) * (rest / (V - k)) ** (1/T). That is the most even spread the cache allows and so
over-weights the rest at T > 1: with the adapted MiniLM teacher the top 10 hold about 52%
of the probability at T=1 but only about 4% at T=2, and the even spread puts still less
there. At T=1 (the default) nothing is assumed. The soft term is scaled by T**2 so its
gradients keep their size as T changes (Hinton et al.; DistilBERT).
"""

from __future__ import annotations

import tensorflow as tf


def tempered_teacher(topk_probs: tf.Tensor, rest: tf.Tensor, temperature: float, vocab_size: int):
    """(top-k log-probabilities [..., k], rest log-probability [...]) at `temperature`."""
    k = topk_probs.shape[-1]
    log_top = tf.math.log(tf.maximum(topk_probs, 1e-30)) / temperature
    others = float(max(vocab_size - k, 1))
    log_rest = tf.where(rest > 0, tf.math.log(others) + (tf.math.log(tf.maximum(rest, 1e-30)) - tf.math.log(others))
                        / temperature, -1e30)
    norm = tf.reduce_logsumexp(tf.concat([log_top, log_rest[..., None]], axis=-1), axis=-1)
    return log_top - norm[..., None], log_rest - norm


def student_log_probs(student_logits: tf.Tensor, topk_ids: tf.Tensor, temperature: float):
    """(log q of the top-k words [..., k], log q of everything else [...]) at `temperature`.

    The rest is a log-sum-exp over the logits outside the top k, not 1 - sum(top k): once the
    student is confident that difference is 0 in float32, its loss wrong and its gradient gone.
    """
    logits = tf.cast(student_logits, tf.float32) / temperature
    vocab = logits.shape[-1]
    log_z = tf.reduce_logsumexp(logits, axis=-1)
    log_top = tf.gather(logits, topk_ids, batch_dims=2) - log_z[..., None]
    rows = tf.reshape(logits, [-1, vocab])
    ids = tf.reshape(tf.cast(topk_ids, tf.int32), [tf.shape(rows)[0], -1])
    k = tf.shape(ids)[1]
    where = tf.stack([tf.repeat(tf.range(tf.shape(rows)[0]), k), tf.reshape(ids, [-1])], axis=1)
    # A large finite value, not -inf: with k = V every entry is masked and the gradient must stay finite.
    outside = tf.tensor_scatter_nd_update(rows, where, tf.fill([tf.shape(where)[0]], -1e9))
    log_rest = tf.reshape(tf.reduce_logsumexp(outside, axis=-1), tf.shape(log_z)) - log_z
    return log_top, log_rest


def soft_mlm_kl(student_logits: tf.Tensor, topk_ids: tf.Tensor, topk_probs: tf.Tensor, rest: tf.Tensor,
                temperature: float = 1.0) -> tf.Tensor:
    """T^2 * KL(teacher_T || student_T) at every masked position [B, P], padding included.

    student_logits [B, P, V]; topk_ids, topk_probs [B, P, k]; rest [B, P].
    """
    vocab_size = student_logits.shape[-1]
    log_q_top, log_q_rest = student_log_probs(student_logits, topk_ids, temperature)
    log_p_top, log_p_rest = tempered_teacher(topk_probs, rest, temperature, vocab_size)
    p_top, p_rest = tf.exp(log_p_top), tf.exp(log_p_rest)
    kl = (tf.reduce_sum(p_top * (log_p_top - log_q_top), axis=-1)
          + tf.math.xlogy(p_rest, p_rest) - p_rest * log_q_rest)
    return temperature**2 * kl


def soft_mlm_loss(student_logits: tf.Tensor, topk_ids: tf.Tensor, topk_probs: tf.Tensor, rest: tf.Tensor,
                  weights: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    """soft_mlm_kl averaged over the real masked positions (weights [B, P])."""
    kl = soft_mlm_kl(student_logits, topk_ids, topk_probs, rest, temperature)
    weights = tf.cast(weights, tf.float32)
    return tf.reduce_sum(kl * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def masked_lm_loss(logits: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over the real masked positions ([B, P, V], [B, P], [B, P])."""
    per_position = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=tf.cast(logits, tf.float32))
    weights = tf.cast(weights, tf.float32)
    return tf.reduce_sum(per_position * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def next_sentence_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def soft_next_sentence_loss(student_logits: tf.Tensor, teacher_logits: tf.Tensor, temperature: float = 1.0):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_p = tf.nn.log_softmax(teacher_logits / temperature)
    log_q = tf.nn.log_softmax(student_logits / temperature)
    return temperature**2 * tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1))
