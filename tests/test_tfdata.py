"""The training input pipeline: shards are read interleaved, not one after the other."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")

from bertdistill.tfdata import records  # noqa: E402


def test_every_shard_contributes_from_the_first_records(two_label_shards):
    paths = sorted(str(p) for p in (two_label_shards / "train").glob("*.tfrecord"))
    assert len(paths) == 2
    firsts = [next(iter(tf.data.TFRecordDataset(p))).numpy() for p in paths]
    seconds = [list(tf.data.TFRecordDataset(p).take(2))[1].numpy() for p in paths]
    head = [r.numpy() for r in records(paths).take(4)]
    assert head == [firsts[0], firsts[1], seconds[0], seconds[1]]
    total = sum(1 for p in paths for _ in tf.data.TFRecordDataset(p))
    assert sum(1 for _ in records(paths)) == total
