"""A whole-file shuffle of framed TFRecords in bounded memory: an external sort by random keys.

Every record comes with a 64-bit key that is a hash of what made it (make-examples: the document's
content, the dupe pass and the instance's place in the document), and the output is the records
in key order. Hash keys make that a uniform shuffle, as Google's whole-shard shuffle is, and a
stable one: next month, the examples of an unchanged article keep their keys, so they keep their
order relative to each other and the first N examples of a shard are mostly last month's first
N, whose teacher labels label-teacher can reuse.

Pass one sends each record to the bucket of its key's top bits (a range of keys), with the keys
beside it; pass two sorts each bucket in memory and appends it to the output. Memory holds one
bucket, never the file.
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
def shuffled_output(out: BinaryIO, buckets: int, scratch: Path) -> Iterator:
    """Yields add(framed_records, keys): a batch of records and their uint64 keys; the records are
    written to `out` in key order on exit (equal keys in the order they were added)."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="buckets-") as tmp, ExitStack() as stack:
        files = [stack.enter_context(open(Path(tmp) / f"{b:05d}", "w+b")) for b in range(buckets)]
        key_files = [stack.enter_context(open(Path(tmp) / f"{b:05d}.keys", "w+b")) for b in range(buckets)]

        def add(data: bytes, keys: np.ndarray) -> None:
            records = split_framed(data)
            keys = keys.astype(np.uint64)
            target = ((keys >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)  # monotone in the key
            for b in np.unique(target):
                chosen = np.flatnonzero(target == b)
                files[b].write(b"".join(records[i] for i in chosen))
                key_files[b].write(keys[chosen].tobytes())

        yield add
        for f, k in zip(files, key_files, strict=True):
            f.seek(0)
            k.seek(0)
            records = split_framed(f.read())
            order = np.argsort(np.frombuffer(k.read(), dtype=np.uint64), kind="stable")
            out.writelines(records[i] for i in order)  # no joined copy of the bucket beside it
