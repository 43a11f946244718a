"""How much a scratch folder held at its fullest: for tests and benchmarks of bounded local disk."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path


class ScratchPeak:
    """The most bytes a folder tree held at once, sampled every 10 ms while the block runs."""

    def __init__(self, root: Path):
        self.root, self.peak, self._stop = root, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.is_set():
            total = 0
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    with contextlib.suppress(OSError):  # removed while we looked
                        total += os.stat(os.path.join(dirpath, f)).st_size
            self.peak = max(self.peak, total)
            time.sleep(0.01)
