"""The learning-rate schedule of distill and adapt-teacher: a warm-up sized by the run's own length."""

from __future__ import annotations

import argparse
from itertools import pairwise

import pytest

tf = pytest.importorskip("tensorflow")

from bertdistill.errors import StepError  # noqa: E402
from bertdistill.flags import add_flags  # noqa: E402
from bertdistill.optim import learning_rate  # noqa: E402
from bertdistill.steps import adapt_teacher  # noqa: E402
from bertdistill.steps.adapt_teacher import AdaptTeacherParams  # noqa: E402
from bertdistill.steps.distill import DistillParams  # noqa: E402


def _distill(**kw) -> DistillParams:
    return DistillParams(teacher="t", labels="l", output="o", **kw)


def _adapt(**kw) -> AdaptTeacherParams:
    return AdaptTeacherParams(teacher="t", examples="e", output="o", **kw)


def _rates(params) -> list[float]:
    """The learning rate of each update of the run, at peak 1."""
    return [float(learning_rate(tf.constant(step), 1.0, params.warmup(), params.steps))
            for step in range(1, params.steps + 1)]


@pytest.mark.parametrize("make", [_distill, _adapt], ids=["distill", "adapt-teacher"])
def test_a_30_step_run_reaches_its_peak_learning_rate_early_and_decays_after(make):
    """With the former fixed 30-step warm-up a 30-step run rose for all its steps and never decayed."""
    params = make(steps=30)
    rates = _rates(params)
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(1.0)
    assert peak == 2  # step 3: a tenth of the run
    assert all(a < b for a, b in pairwise(rates[: peak + 1]))  # rising to the peak
    assert all(a > b for a, b in pairwise(rates[peak:]))  # then falling every step
    assert rates[-1] == pytest.approx(0.0)


@pytest.mark.parametrize("make", [_distill, _adapt], ids=["distill", "adapt-teacher"])
def test_the_warm_up_is_a_tenth_of_the_steps_unless_given(make):
    assert make().warmup() == 30  # the default 300 steps warm up as long as before
    assert make(steps=200).warmup() == 20
    assert make(steps=10_000).warmup() == 1_000
    assert make(steps=1).warmup() == 0
    assert make(steps=30, warmup_fraction=0.5).warmup() == 15
    assert make(steps=30, warmup_fraction=0.99).warmup() == 29  # always one step left to decay in
    assert make(steps=30, warmup_steps=7).warmup() == 7


def test_the_flags_set_the_warm_up_and_an_impossible_one_is_refused():
    parser = argparse.ArgumentParser()
    add_flags(parser, DistillParams, skip=("force",))
    args = parser.parse_args(["--teacher", "t", "--labels", "l", "--output", "o", "--steps", "40",
                              "--warmup-fraction", "0.25"])
    assert DistillParams(**vars(args)).warmup() == 10
    with pytest.raises(StepError, match="no step of the 30 to decay in"):
        _distill(steps=30, warmup_steps=30).validate()
    with pytest.raises(StepError, match="--warmup-fraction must be at least 0 and below 1"):
        _distill(warmup_fraction=1.0).validate()
    with pytest.raises(StepError, match="no step of the 30 to decay in"):
        adapt_teacher.run(_adapt(steps=30, warmup_steps=30))
