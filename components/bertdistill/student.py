"""The student: a config derived from the teacher's, initialised from evenly spaced teacher layers.

DistilBERT keeps 97% of BERT's quality with half the layers by starting the student from
every other teacher layer; `evenly_spaced_layers` generalises that (6 -> 3 takes layers
0, 2, 4). Embeddings and heads are copied whole, which needs the teacher's hidden size;
a narrower student starts from random weights instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bertdistill.bert.config import BertConfig
from bertdistill.errors import StepError


def student_config(teacher: BertConfig, layers: int | None = None, hidden: int | None = None,
                   heads: int | None = None, intermediate: int | None = None) -> BertConfig:
    """The teacher's config with the given sizes replaced; the vocab is always the teacher's."""
    hidden = hidden or teacher.hidden_size
    changes = {"num_hidden_layers": layers or teacher.num_hidden_layers, "hidden_size": hidden,
               "num_attention_heads": heads or (teacher.num_attention_heads if hidden == teacher.hidden_size
                                                else max(1, hidden // 64)),
               "intermediate_size": intermediate or (teacher.intermediate_size * hidden // teacher.hidden_size)}
    if changes["num_hidden_layers"] < 1:
        raise StepError(f"--student-layers must be at least 1, got {layers}")
    return dataclasses.replace(teacher, **changes)


def check_student_config(student: BertConfig, teacher: BertConfig, source: str) -> None:
    if student.vocab_size != teacher.vocab_size:
        raise StepError(f"{source}: the student's vocab_size {student.vocab_size} differs from the teacher's "
                        f"{teacher.vocab_size}; a student must share the teacher's vocab to learn from its labels")


def evenly_spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    if student_layers > teacher_layers:
        raise StepError(f"a {student_layers}-layer student cannot start from a {teacher_layers}-layer teacher's "
                        "layers; use random initialisation or fewer layers")
    return [round(i * teacher_layers / student_layers) for i in range(student_layers)]


def init_from_teacher(teacher_weights: dict[str, np.ndarray], teacher: BertConfig, student: BertConfig
                      ) -> dict[str, np.ndarray]:
    """Student weights: the teacher's embeddings, heads and evenly spaced layers, renumbered."""
    if (student.hidden_size, student.intermediate_size, student.num_attention_heads) != (
            teacher.hidden_size, teacher.intermediate_size, teacher.num_attention_heads):
        raise StepError("initialising from teacher layers needs the teacher's hidden, intermediate and head "
                        "sizes; give a narrower student --student-init random")
    chosen = evenly_spaced_layers(teacher.num_hidden_layers, student.num_hidden_layers)
    out = {n: v.copy() for n, v in teacher_weights.items() if not n.startswith("bert/encoder/")}
    for new, old in enumerate(chosen):
        prefix = f"bert/encoder/layer_{old}/"
        for name, value in teacher_weights.items():
            if name.startswith(prefix):
                out[f"bert/encoder/layer_{new}/{name[len(prefix):]}"] = value.copy()
    return out
