"""tf.data pipelines over the platform's TFRecords (steps that already import TensorFlow).

Shards are read interleaved, one record from each in turn, not one after the other: each
shard is shuffled as a whole by make-examples, and interleaving makes every batch draw from
all of them, so a 10,000-example shuffle buffer is not the only thing between a batch and
a single shard's order.
"""

from __future__ import annotations

import tensorflow as tf

from bertdistill.records import pretraining_shapes
from bertdistill.store import interleaved_records, local_path


def pretraining_spec(max_seq_length: int, max_predictions: int) -> dict[str, tf.io.FixedLenFeature]:
    return {name: tf.io.FixedLenFeature([n], tf.int64 if kind == "int64" else tf.float32)
            for name, (kind, n) in pretraining_shapes(max_seq_length, max_predictions).items()}


def records(uris: list[str]) -> tf.data.Dataset:
    """Serialized records of all shards, interleaved one by one (sequential, so the order is fixed).

    Local files are read by TensorFlow itself. Shards in an object store are streamed from it
    in the same order (store.interleaved_records), never copied to local disk first: a
    training reading 1,000 label shards needs a read buffer per shard, not their size in
    scratch."""
    local = [local_path(u) for u in uris]
    if all(p is not None for p in local):
        return tf.data.Dataset.from_tensor_slices(local).interleave(
            tf.data.TFRecordDataset, cycle_length=max(len(local), 1), block_length=1)
    return tf.data.Dataset.from_generator(lambda: interleaved_records(list(uris)),
                                          output_signature=tf.TensorSpec([], tf.string))


def pretraining_dataset(paths: list[str], max_seq_length: int, max_predictions: int, batch_size: int,
                        shuffle: bool = False, repeat: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Batches of int32 features (int64 on the wire; int32 is what gathers and matmuls want)."""
    spec = pretraining_spec(max_seq_length, max_predictions)
    ds = records(paths)
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def parse(raw):
        batch = tf.io.parse_example(raw, spec)
        return {k: (v if v.dtype == tf.float32 else tf.cast(v, tf.int32)) for k, v in batch.items()}

    return ds.batch(batch_size, drop_remainder=repeat).map(parse, num_parallel_calls=2).prefetch(2)


def labelled_dataset(paths: list[str], max_seq_length: int, max_predictions: int, top_k: int, batch_size: int,
                     shuffle: bool = False, repeat: bool = False, seed: int = 0, mixed_in: list[str] = (),
                     mixed_share: float = 0.0) -> tf.data.Dataset:
    """Batches of labelled examples: the pretraining features plus the teacher's four fields,
    decoded by records.decode_labels (one decoder for every reader).

    `mixed_in` (shards read shuffled and repeated on their own) supplies each example with
    probability `mixed_share`, drawn with the seed: the same sequence on every rerun, so a
    resumed run skips to where it was."""
    import numpy as np

    from bertdistill.records import LABEL_FEATURE, decode_labels

    spec = pretraining_spec(max_seq_length, max_predictions)
    spec[LABEL_FEATURE.decode()] = tf.io.FixedLenFeature([], tf.string)
    ds = records(paths)
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if mixed_in and mixed_share > 0:
        mixed = records(mixed_in).shuffle(10_000, seed=seed + 1, reshuffle_each_iteration=True).repeat()
        ds = tf.data.Dataset.sample_from_datasets([ds, mixed], [1 - mixed_share, mixed_share], seed=seed)

    def decode(blobs, weights):
        rows = [decode_labels(blob, max_predictions, top_k, int((w > 0).sum()))
                for blob, w in zip(blobs, weights, strict=True)]
        return (np.stack([r["teacher_topk_ids"] for r in rows]).astype(np.int32).reshape(-1, max_predictions, top_k),
                np.stack([r["teacher_topk_probs"] for r in rows]).reshape(-1, max_predictions, top_k),
                np.stack([r["teacher_rest_prob"] for r in rows]),
                np.stack([r["teacher_nsp_logits"] for r in rows]))

    def parse(raw):
        batch = tf.io.parse_example(raw, spec)
        ids, probs, rest, nsp = tf.numpy_function(decode, [batch.pop(LABEL_FEATURE.decode()),
                                                           batch["masked_lm_weights"]],
                                                  [tf.int32, tf.float32, tf.float32, tf.float32], stateful=False)
        out = {k: (v if v.dtype == tf.float32 else tf.cast(v, tf.int32)) for k, v in batch.items()}
        out.update(teacher_topk_ids=tf.ensure_shape(ids, [None, max_predictions, top_k]),
                   teacher_topk_probs=tf.ensure_shape(probs, [None, max_predictions, top_k]),
                   teacher_rest_prob=tf.ensure_shape(rest, [None, max_predictions]),
                   teacher_nsp_logits=tf.ensure_shape(nsp, [None, 2]))
        return out

    return ds.batch(batch_size, drop_remainder=repeat).map(parse, num_parallel_calls=2).prefetch(2)
