"""Progress lines for long steps: often enough to see life in a task log, rarely enough
not to flood it (one line every few seconds, whatever the loop's speed)."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, log: logging.Logger, what: str, total: float | None = None, every: float = 5.0):
        self.log, self.what, self.total, self.every = log, what, total, every
        self.started = self.last = time.monotonic()

    def update(self, done: float, unit: str = "") -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        share = f" ({100 * done / self.total:.1f}%)" if self.total else ""
        self.log.info("%s: %s%s%s, %.1f%s/s", self.what, f"{done:,.0f}", unit, share, rate, unit)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
