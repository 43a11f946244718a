"""tf.data pipelines over the platform's TFRecords (steps that already import TensorFlow)."""

from __future__ import annotations

import tensorflow as tf

from bertdistill.records import pretraining_shapes


def pretraining_spec(max_seq_length: int, max_predictions: int) -> dict[str, tf.io.FixedLenFeature]:
    return {name: tf.io.FixedLenFeature([n], tf.int64 if kind == "int64" else tf.float32)
            for name, (kind, n) in pretraining_shapes(max_seq_length, max_predictions).items()}


def pretraining_dataset(paths: list[str], max_seq_length: int, max_predictions: int, batch_size: int,
                        shuffle: bool = False, repeat: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Batches of int32 features (int64 on the wire; int32 is what gathers and matmuls want)."""
    spec = pretraining_spec(max_seq_length, max_predictions)
    ds = tf.data.TFRecordDataset(paths)
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def parse(raw):
        batch = tf.io.parse_example(raw, spec)
        return {k: (v if v.dtype == tf.float32 else tf.cast(v, tf.int32)) for k, v in batch.items()}

    return ds.batch(batch_size, drop_remainder=repeat).map(parse, num_parallel_calls=2).prefetch(2)
