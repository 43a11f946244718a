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

from bertdistill.tfrecord import FLOAT, INT64, decode_example, encode_example, frame, packed_varints, read_records

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
