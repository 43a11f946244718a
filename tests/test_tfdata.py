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


def test_a_mixed_in_shard_supplies_its_share_of_examples_in_the_same_order_every_time(two_label_shards):
    """Training reads shard 0 and mixes in shard 1 at a share of 0.3 (a warm start's fresh articles):
    about 30% of the examples come from shard 1, drawn the same way on every rerun (a resumed run
    skips to where it was); at share 0 none do."""
    import numpy as np

    from bertdistill.shards import examples_info
    from bertdistill.tfdata import labelled_dataset

    train, fresh = sorted(str(p) for p in (two_label_shards / "train").glob("*.tfrecord"))
    info = examples_info(str(two_label_shards.parent / "examples" / "shard-00000.tfrecord"))
    L, P = info["max_seq_length"], info["max_predictions_per_seq"]
    fresh_rows = {r.tobytes() for b in labelled_dataset([fresh], L, P, 10, 64) for r in b["input_ids"].numpy()}

    def drawn(share: float) -> list[bool]:
        batches = labelled_dataset([train], L, P, 10, 16, shuffle=True, repeat=True, seed=3, mixed_in=[fresh],
                                   mixed_share=share).take(40)
        return [r.tobytes() in fresh_rows for b in batches for r in b["input_ids"].numpy()]

    first = drawn(0.3)
    assert 0.22 < np.mean(first) < 0.38, np.mean(first)  # 640 draws: 0.3 +- 3 standard deviations
    assert drawn(0.3) == first
    assert not any(drawn(0.0))
