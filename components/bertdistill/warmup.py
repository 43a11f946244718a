"""The warm-up length of adapt-teacher's and distill's learning-rate schedule, from their flags.

Why a fraction by default: a fixed count fits one run length only. The former 30 steps were a
tenth of a 300-step trial but the whole of a 30-step one, which then never reached its peak
learning rate nor decayed. No TensorFlow here: the steps' params are read by the DAG's side.
"""

from __future__ import annotations

from bertdistill.errors import StepError


def warmup_length(steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    """`warmup_steps` when given, else `warmup_fraction` of `steps`; refused when no step is left to decay."""
    if not 0 <= warmup_fraction < 1:
        raise StepError(f"--warmup-fraction must be at least 0 and below 1, got {warmup_fraction}")
    length = warmup_steps if warmup_steps is not None else min(round(warmup_fraction * steps), steps - 1)
    if length >= steps:
        raise StepError(f"a warm-up of {length} steps leaves no step of the {steps} to decay in: "
                        "give fewer --warmup-steps, or none to use --warmup-fraction")
    return length
