"""Student configs and DistilBERT-style initialisation from teacher layers."""

from __future__ import annotations

import numpy as np
import pytest

from bertdistill.bert.config import BertConfig
from bertdistill.errors import StepError
from bertdistill.student import check_student_config, evenly_spaced_layers, init_from_teacher, student_config

TEACHER = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(6, 3) == [0, 2, 4]
    assert evenly_spaced_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert evenly_spaced_layers(12, 4) == [0, 3, 6, 9]
    assert evenly_spaced_layers(6, 6) == list(range(6))
    with pytest.raises(StepError, match="cannot start from"):
        evenly_spaced_layers(6, 7)


def test_student_takes_the_teachers_layers_renumbered():
    pytest.importorskip("tensorflow")
    from bertdistill.bert.model import variable_shapes

    rng = np.random.default_rng(0)
    teacher = {n: rng.normal(size=s).astype(np.float32) for n, s in variable_shapes(TEACHER).items()}
    config = student_config(TEACHER, layers=3)
    student = init_from_teacher(teacher, TEACHER, config)
    assert set(student) == set(variable_shapes(config))
    for new, old in enumerate([0, 2, 4]):
        np.testing.assert_array_equal(student[f"bert/encoder/layer_{new}/output/dense/kernel"],
                                      teacher[f"bert/encoder/layer_{old}/output/dense/kernel"])
    np.testing.assert_array_equal(student["cls/predictions/output_bias"], teacher["cls/predictions/output_bias"])


def test_a_narrower_student_must_start_randomly_and_vocab_must_match():
    narrow = student_config(TEACHER, layers=2, hidden=8)
    assert (narrow.num_attention_heads, narrow.intermediate_size, narrow.vocab_size) == (1, 16, 100)
    with pytest.raises(StepError, match="--student-init random"):
        init_from_teacher({}, TEACHER, narrow)
    other = BertConfig(vocab_size=99, hidden_size=16, num_attention_heads=4)
    with pytest.raises(StepError, match="vocab_size 99 differs"):
        check_student_config(other, TEACHER, "student.json")
