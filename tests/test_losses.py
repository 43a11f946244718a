"""Distillation losses: the top-k + rest KL is the dense KL when k is the whole vocab."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from bertdistill.losses import soft_mlm_loss, soft_next_sentence_loss, tempered_teacher  # noqa: E402


def _dense_kl(teacher_logits, student_logits, weights, T):
    p = tf.nn.softmax(teacher_logits / T)
    kl = tf.reduce_sum(p * (tf.nn.log_softmax(teacher_logits / T) - tf.nn.log_softmax(student_logits / T)), -1)
    return T**2 * tf.reduce_sum(kl * weights) / tf.reduce_sum(weights)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_top_k_loss_with_k_equal_to_vocab_is_the_dense_kl(temperature):
    rng = np.random.default_rng(0)
    B, P, V = 3, 5, 50
    teacher = tf.constant(rng.normal(0, 3, (B, P, V)), tf.float32)
    student = tf.constant(rng.normal(0, 3, (B, P, V)), tf.float32)
    weights = tf.constant((rng.random((B, P)) < 0.8).astype(np.float32))
    probs = tf.nn.softmax(teacher)
    top_probs, top_ids = tf.math.top_k(probs, V)
    rest = tf.zeros((B, P))
    ours = soft_mlm_loss(student, top_ids, top_probs, rest, weights, temperature)
    np.testing.assert_allclose(ours.numpy(), _dense_kl(teacher, student, weights, temperature).numpy(), rtol=1e-5)


def test_top_k_loss_at_t1_is_the_kl_over_top_k_and_rest_bucket():
    rng = np.random.default_rng(1)
    V, k = 40, 4
    teacher = rng.normal(0, 2, (1, 1, V))
    student = tf.constant(rng.normal(0, 2, (1, 1, V)), tf.float32)
    p = np.exp(teacher) / np.exp(teacher).sum()
    ids = np.argsort(-p[0, 0])[:k]
    q = tf.nn.softmax(student).numpy()[0, 0]
    rest_p, rest_q = 1 - p[0, 0, ids].sum(), 1 - q[ids].sum()
    expected = (p[0, 0, ids] * np.log(p[0, 0, ids] / q[ids])).sum() + rest_p * np.log(rest_p / rest_q)
    ours = soft_mlm_loss(student, tf.constant(ids[None, None]), tf.constant(p[:, :, ids], tf.float32),
                         tf.constant([[rest_p]], tf.float32), tf.ones((1, 1)), 1.0)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4)
    assert ours.numpy() > 0


def test_tempering_moves_mass_to_the_rest():
    top = tf.constant([[0.3, 0.1, 0.05, 0.05]])
    rest = tf.constant([0.5])
    log_top, log_rest = tempered_teacher(top, rest, 2.0, 30522)
    assert abs(float(tf.reduce_sum(tf.exp(log_top)) + tf.exp(log_rest)[0]) - 1) < 1e-5
    assert float(tf.reduce_sum(tf.exp(log_top))) < 0.05  # from 50% at T=1


def test_soft_next_sentence_loss_is_zero_on_agreement():
    logits = tf.constant([[1.0, -1.0], [0.2, 0.4]])
    assert abs(float(soft_next_sentence_loss(logits, logits, 2.0))) < 1e-6
    assert float(soft_next_sentence_loss(logits, logits[::-1], 1.0)) > 0


def test_a_confident_students_rest_mass_keeps_its_loss_and_gradient():
    """Student sure of one word (rest about e^-20): 1 - sum(top k) is 0 in float32; the loss must still
    match a float64 reference and push mass back to the words the teacher gives 30%."""
    rng = np.random.default_rng(2)
    V = 300
    student = rng.normal(0, 1, (1, 1, V))
    student[0, 0, 7] += 30.0
    ids = np.array([[[7, 3, 11, 19, 23]]])
    top = np.array([[[0.5, 0.1, 0.05, 0.03, 0.02]]])
    rest = 1 - top.sum(-1)
    z = student - student.max()
    log_q = z - np.log(np.exp(z).sum())
    outside = np.delete(np.arange(V), ids[0, 0])
    log_q_rest = np.log(np.exp(log_q[0, 0, outside]).sum())
    expected = (top * (np.log(top) - log_q[0, 0, ids[0, 0]])).sum() + rest[0, 0] * (np.log(rest[0, 0]) - log_q_rest)
    logits = tf.Variable(student, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = soft_mlm_loss(logits, tf.constant(ids), tf.constant(top, tf.float32), tf.constant(rest, tf.float32),
                             tf.ones((1, 1)), 1.0)
    grad = tape.gradient(loss, logits).numpy()[0, 0]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # d loss / d logit_j = q_j - p_j: for a word outside the top k, q_j - rest * q_j / q_rest
    q = np.exp(log_q[0, 0])
    expected_grad = q[outside] - rest[0, 0] * q[outside] / np.exp(log_q_rest)
    np.testing.assert_allclose(grad[outside], expected_grad, rtol=1e-3, atol=1e-9)
    assert grad[outside].min() < -1e-4  # the student is pushed to give the rest back its mass
