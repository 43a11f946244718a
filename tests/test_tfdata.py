"""The training input pipeline: shards are read interleaved, not one after the other."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.s3
def test_shards_in_the_store_stream_in_the_same_order_without_local_copies(two_label_shards, s3_prefix, tmp_path,
                                                                           monkeypatch):
    """Three shards of unequal length (one cut to 50 records): the streamed order is tf.data's own
    interleave over the local files, and nothing lands in scratch."""
    from bertdistill.store import open_folder
    from bertdistill.tfrecord import frame

    paths = sorted((two_label_shards / "train").glob("*.tfrecord"))
    short = tmp_path / "short.tfrecord"
    short.write_bytes(b"".join(frame(r.numpy()) for r in tf.data.TFRecordDataset(str(paths[0])).take(50)))
    local = [str(p) for p in paths] + [str(short)]
    store = open_folder(s3_prefix)
    for i, path in enumerate(local):
        store.write_bytes(f"labels/shard-{i}.tfrecord", Path(path).read_bytes())
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("BERTDISTILL_SCRATCH", str(scratch))
    streamed = [r.numpy() for r in records([store.child_uri(f"labels/shard-{i}.tfrecord") for i in range(3)])]
    expected = [r.numpy() for r in records(local)]
    assert streamed == expected and len(expected) > 150
    assert not scratch.exists() or not any(p.is_file() for p in scratch.rglob("*"))
