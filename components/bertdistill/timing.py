"""Timing several models on one machine so that the comparison, not the machine, decides.

The models take turns, one call each per round, so a slow spell of a shared machine (another
process, a frequency change) falls on all of them rather than on one. Between calls a pause:
the runtime timed before keeps its threads spinning a while after a call, on the same cores,
and the next call measured that instead of itself (bench/serving.py: without a pause ONNX
Runtime's int8 looked slower than fp32 after a TensorFlow call).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


def take_turns(calls: dict[Hashable, Callable[[], object]], rounds: int, warmup: int = 1,
               pause_s: float | None = None) -> dict[Hashable, list[float]]:
    """Seconds of each call in each round, after `warmup` untimed calls each (tracing, allocation).

    `pause_s` None pauses as long as the last call took, at most 0.1 s: enough for spinning
    threads to settle without doubling a long benchmark."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    seconds: dict[Hashable, list[float]] = {key: [] for key in calls}
    took = 0.0
    for _ in range(rounds):
        for key, call in calls.items():
            time.sleep(min(0.1, took) if pause_s is None else pause_s)
            started = time.perf_counter()
            call()
            took = time.perf_counter() - started
            seconds[key].append(took)
    return seconds
