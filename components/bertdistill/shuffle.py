"""A whole-file shuffle of framed TFRecords in bounded memory: the two-pass external shuffle.

Pass one sends every record to a random one of `buckets` temporary files; pass two permutes
each bucket in memory and appends it to the output. Each record lands in a uniformly random
place of the output, and memory holds one bucket, never the file. Seeds come from the
caller, so the same input in the same order gives the same bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bertdistill.tfrecord import split_framed


@contextmanager
def shuffled_output(out: BinaryIO, buckets: int, seed: int, scratch: Path) -> Iterator:
    """Yields add(framed_records, rng): scatter a batch of records; the shuffled file is written on exit."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="buckets-") as tmp, ExitStack() as stack:
        files = [stack.enter_context(open(Path(tmp) / f"{b:05d}", "w+b")) for b in range(buckets)]

        def add(data: bytes, rng: np.random.Generator) -> None:
            if buckets == 1:
                files[0].write(data)
                return
            records = split_framed(data)
            target = rng.integers(0, buckets, len(records))
            for b in np.unique(target):
                files[b].write(b"".join(records[i] for i in np.flatnonzero(target == b)))

        yield add
        for b, f in enumerate(files):
            f.seek(0)
            records = split_framed(f.read())
            order = np.random.default_rng([seed, b, 2]).permutation(len(records))
            out.writelines(records[i] for i in order)  # no joined copy of the bucket beside it
