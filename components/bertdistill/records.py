"""The TFRecord schemas of DESIGN.md: one writer and one reader per schema.

Pretraining example (Google BERT's create_pretraining_data features, L = max_seq_length,
P = max_predictions_per_seq): input_ids[L], input_mask[L], segment_ids[L],
masked_lm_positions[P], masked_lm_ids[P] (int64), masked_lm_weights[P] (float),
next_sentence_labels[1] (int64, 1 = the second segment is a random one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from bertdistill.tfrecord import (
    FLOAT,
    INT64,
    bytes_entry,
    bytes_list_body,
    decode_example,
    encode_example,
    frame,
    packed_varints,
    read_records,
    read_varint,
    varint,
)

PRETRAINING_FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                        "masked_lm_weights", "next_sentence_labels")


def pretraining_shapes(max_seq_length: int, max_predictions_per_seq: int) -> dict[str, tuple[str, int]]:
    """Feature name -> (dtype, length): what a TensorFlow reader passes to FixedLenFeature."""
    L, P = max_seq_length, max_predictions_per_seq
    return {"input_ids": ("int64", L), "input_mask": ("int64", L), "segment_ids": ("int64", L),
            "masked_lm_positions": ("int64", P), "masked_lm_ids": ("int64", P),
            "masked_lm_weights": ("float32", P), "next_sentence_labels": ("int64", 1)}


@dataclass
class PretrainingBatch:
    """N examples as padded arrays ([N, L] or [N, P] each, [N] for the labels)."""

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    masked_lm_positions: np.ndarray
    masked_lm_ids: np.ndarray
    masked_lm_weights: np.ndarray
    next_sentence_labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_pretraining(batch: PretrainingBatch) -> bytes:
    """All examples of the batch as framed TFRecords, back to back."""
    ids, ids_end = packed_varints(batch.input_ids)
    pos, pos_end = packed_varints(batch.masked_lm_positions)
    mlm, mlm_end = packed_varints(batch.masked_lm_ids)
    # 0/1 features are one varint byte per value: the uint8 row is the packed encoding.
    mask_rows = batch.input_mask.astype(np.uint8)
    seg_rows = batch.segment_ids.astype(np.uint8)
    weight_rows = batch.masked_lm_weights.astype("<f4")
    labels = batch.next_sentence_labels.astype(np.uint8).reshape(-1)
    out = []
    prev_ids = prev_pos = prev_mlm = 0
    for r in range(len(batch)):
        example = encode_example([
            (b"input_ids", INT64, ids[prev_ids : ids_end[r]]),
            (b"input_mask", INT64, mask_rows[r].tobytes()),
            (b"segment_ids", INT64, seg_rows[r].tobytes()),
            (b"masked_lm_positions", INT64, pos[prev_pos : pos_end[r]]),
            (b"masked_lm_ids", INT64, mlm[prev_mlm : mlm_end[r]]),
            (b"masked_lm_weights", FLOAT, weight_rows[r].tobytes()),
            (b"next_sentence_labels", INT64, labels[r : r + 1].tobytes()),
        ])
        out.append(frame(example))
        prev_ids, prev_pos, prev_mlm = ids_end[r], pos_end[r], mlm_end[r]
    return b"".join(out)


def read_pretraining(f: BinaryIO, name: str = "<stream>") -> Iterator[dict[str, np.ndarray]]:
    for payload in read_records(f, name):
        yield decode_example(payload)


# ---- labelled examples ------------------------------------------------------------------
# The teacher's view of an example travels as one bytes feature, `teacher`, that the reader
# expands into DESIGN.md's four fields. Only the example's n real masked positions are
# stored (n is the count of its non-zero masked_lm_weights; k comes from the manifest):
#   uint8 version, float16 nsp_logits[2], uint16 topk_mass[n] (x 65535),
#   n*k entries of 23 bits, big-endian bit-packed: id (15 bits) << 8 | -ln(p) in 1/32 nat (8 bits)
# The top-k mass (1 - rest) keeps 1.5e-5 absolute precision, so a small rest and a small
# top-k mass both survive. Each stored top-k probability is within e^(1/64) of the teacher's
# (those below the floor e^(-255/32) = 3.5e-4 are stored as the floor). The reader scales a
# position's k probabilities towards its stored mass, by at most another e^(1/64), so every
# probability distill reads above the floor is within e^(1/32) - 1 = 3.2% of the teacher's
# (PRECISION; a test holds the reader to it), and they sum with the rest to 1 unless the
# floor was hit. At L=128, P=20, k=10: at most 19 positions x 30.75 bytes + 5, about 0.60 KB
# per example with the feature's framing.
LABEL_FEATURE = b"teacher"
LABEL_VERSION = 4
TOP_K = 10  # teacher probabilities kept per masked position unless a run asks for another k
LOGPROB_STEPS = 32.0
ID_BITS, LOGPROB_BITS = 15, 8
ENTRY_BITS = ID_BITS + LOGPROB_BITS
MAX_VOCAB = 1 << ID_BITS
PROB_FLOOR = float(np.exp(-((1 << LOGPROB_BITS) - 1) / LOGPROB_STEPS))
PRECISION = float(np.expm1(1 / LOGPROB_STEPS))
_HALF_STEP = 0.5 / LOGPROB_STEPS
_BIT_WEIGHTS = 1 << np.arange(ENTRY_BITS - 1, -1, -1, dtype=np.int64)


def encode_labels(n_real: np.ndarray, topk_ids: np.ndarray, topk_probs: np.ndarray, rest: np.ndarray,
                  nsp_logits: np.ndarray) -> list[bytes]:
    """Per example, the `teacher` blob. Arrays are [N, P, k], [N, P, k], [N, P], [N, 2]."""
    if topk_ids.max(initial=0) >= 1 << ID_BITS:
        raise ValueError(f"label encoding stores ids in {ID_BITS} bits: vocabularies up to {MAX_VOCAB:,} pieces")
    top = (1 << LOGPROB_BITS) - 1
    q = np.clip(np.rint(-np.log(np.maximum(topk_probs, 1e-30)) * LOGPROB_STEPS), 0, top).astype(np.int64)
    entries = (topk_ids.astype(np.int64) << LOGPROB_BITS) | q  # [N, P, k]
    bits = ((entries[..., None] >> np.arange(ENTRY_BITS - 1, -1, -1)) & 1).astype(np.uint8)  # [N, P, k, ENTRY_BITS]
    mass16 = np.rint(np.clip(1.0 - rest, 0.0, 1.0) * 65535).astype("<u2")
    nsp16 = nsp_logits.astype("<f2")
    return [b"".join((bytes((LABEL_VERSION,)), nsp16[r].tobytes(), mass16[r, :n].tobytes(),
                      np.packbits(bits[r, :n].reshape(-1)).tobytes()))
            for r, n in enumerate(n_real.tolist())]


def decode_labels(blob: bytes, max_predictions: int, k: int, n: int) -> dict[str, np.ndarray]:
    """The `teacher` blob of an example with n real masked positions, as teacher_topk_ids[P*k],
    teacher_topk_probs[P*k], teacher_rest_prob[P], teacher_nsp_logits[2] (zeros at padding)."""
    if blob[0] != LABEL_VERSION:
        raise ValueError(f"unknown teacher label encoding version {blob[0]}")
    P = max_predictions
    nsp = np.frombuffer(blob, "<f2", 2, 1).astype(np.float32)
    rest = np.zeros(P, np.float32)
    rest[:n] = 1.0 - np.frombuffer(blob, "<u2", n, 5) / 65535.0
    bits = np.unpackbits(np.frombuffer(blob, np.uint8, offset=5 + 2 * n))[: n * k * ENTRY_BITS]
    entries = bits.reshape(n * k, ENTRY_BITS).astype(np.int64) @ _BIT_WEIGHTS
    ids = np.zeros((P, k), np.int64)
    ids[:n] = (entries >> LOGPROB_BITS).reshape(n, k)
    probs = np.zeros((P, k), np.float32)
    probs[:n] = np.exp(-(entries & ((1 << LOGPROB_BITS) - 1)).reshape(n, k) / LOGPROB_STEPS)
    # Towards the stored mass, but never further than rounding can explain: a floored entry
    # must not pull the others beyond the stated precision.
    scale = np.clip((1.0 - rest[:n]) / probs[:n].sum(axis=1), np.exp(-_HALF_STEP), np.exp(_HALF_STEP))
    probs[:n] *= scale[:, None]
    return {"teacher_topk_ids": ids.reshape(-1), "teacher_topk_probs": probs.reshape(-1),
            "teacher_rest_prob": rest, "teacher_nsp_logits": nsp}


def append_bytes_feature(example: bytes, key: bytes, value: bytes) -> bytes:
    """A serialized tf.train.Example with one more bytes feature, without re-encoding the rest."""
    return join_label(example, bytes_entry(key, bytes_list_body([value])))


def split_label(labelled: bytes) -> tuple[bytes, bytes] | None:
    """A labelled record -> (the example as make-examples wrote it, the label's map entry), or None
    when its last feature is not the label: what a label cache keys on and what it keeps."""
    if labelled[:1] != b"\x0a":
        return None
    length, start = read_varint(labelled, 1)
    end, at, last = start + length, start, start
    while at < end:
        last = at
        size, at = read_varint(labelled, at + 1)
        at += size
    entry = labelled[last:end]
    _, key_at = read_varint(entry, 1)
    if entry[key_at : key_at + 2 + len(LABEL_FEATURE)] != b"\x0a" + varint(len(LABEL_FEATURE)) + LABEL_FEATURE:
        return None
    body = labelled[start:last]
    return b"\x0a" + varint(len(body)) + body, entry


def join_label(example: bytes, entry: bytes) -> bytes:
    """An example with one more map entry appended (a label's, as split_label returns it): the same
    bytes append_bytes_feature makes."""
    if example[0] != 0x0A:
        raise ValueError("not a serialized tf.train.Example")
    length, at = read_varint(example, 1)
    body = example[at : at + length] + entry
    return b"\x0a" + varint(len(body)) + body


def read_labelled(f: BinaryIO, max_predictions: int, k: int, name: str = "<stream>"
                  ) -> Iterator[dict[str, np.ndarray]]:
    for payload in read_records(f, name):
        example = decode_example(payload)
        blob = example.pop(LABEL_FEATURE.decode())[0]
        n = int((example["masked_lm_weights"] > 0).sum())
        example.update(decode_labels(blob, max_predictions, k, n))
        yield example
