"""Last month's teacher labels, found by example: what label-teacher copies instead of recomputing.

A label is a function of the example's bytes and the teacher's weights (and k), nothing else, and
make-examples makes the same bytes for an unchanged article month after month. So the cache is
keyed by a hash of the example as make-examples wrote it, and holds the label's map entry as
label-teacher appended it: a hit is rejoined to the example byte for byte as labelling would have
made it (records.split_label / join_label).

Only label shards that label-teacher committed with this teacher's weights (sha256), this k, this
vocab and these sequence lengths are read; any other is named in the log and skipped, so a
changed teacher or setting reuses nothing. Memory: about 0.6 KB per cached example at k=10
(60 MB for a 100,000-example shard).
"""

from __future__ import annotations

import hashlib
import logging

from bertdistill.errors import StepError
from bertdistill.manifest import committed_input
from bertdistill.records import split_label
from bertdistill.store import open_folder
from bertdistill.tfrecord import read_records

log = logging.getLogger(__name__)


def example_key(example: bytes) -> bytes:
    return hashlib.blake2b(example, digest_size=16).digest()


def previous_labels(folder_uri: str, shard: str, wanted: dict) -> tuple[dict[bytes, bytes], list[str]]:
    """(example key -> label entry, the shards read) from every label set `<set>/<shard>` in
    `folder_uri` whose manifest matches `wanted` (weights_sha256, top_k, vocab_sha256,
    max_seq_length, max_predictions_per_seq)."""
    folder = open_folder(folder_uri)
    cache: dict[bytes, bytes] = {}
    used = []
    for name in folder.list():
        if name.count("/") != shard.count("/") + 1 or not name.endswith("/" + shard):
            continue
        uri = folder.child_uri(name)
        try:
            made = committed_input(uri, "label-teacher", per_file=True).summary
        except StepError as exc:
            log.info("label cache: skipping %s (%s)", uri, exc)
            continue
        found = {"weights_sha256": made.get("teacher", {}).get("weights_sha256"),
                 **{k: made.get(k) for k in wanted if k != "weights_sha256"}}
        if found != wanted:
            differs = sorted(k for k in wanted if found[k] != wanted[k])
            log.info("label cache: skipping %s (another %s)", uri, ", ".join(differs))
            continue
        with folder.open_read(name) as f:
            for payload in read_records(f, uri):
                parts = split_label(payload)
                if parts is not None:
                    cache[example_key(parts[0])] = parts[1]
        used.append(uri)
    return cache, used
