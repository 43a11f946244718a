"""A model's held-out predictions, kept beside its report so that next month's evaluate, scoring it
as the champion, runs it only on the examples that changed.

Between two monthly dumps most held-out examples come out of make-examples byte for byte the same
(same article, same seed) and label-teacher copies their labels, so the champion would predict
them exactly as it did when it was evaluated as that month's student. A prediction here is a
function of the model's weights and of the example's model inputs and teacher labels (the KL needs
the labels), so the cache is keyed by a hash of those arrays, and a file holds one model's rows,
named by the sha256 of its weights: another model, or another teacher, finds nothing to reuse.

The rows not found are gathered across batches and run in full batches, since a shuffled held-out
shard has a new example in almost every batch: running the batches with any miss would save nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Callable

import numpy as np

from bertdistill.errors import StepError
from bertdistill.manifest import committed_input
from bertdistill.store import open_folder

log = logging.getLogger(__name__)

FOLDER = "predictions"
# What a prediction depends on: the model's inputs and (for the KL) the teacher's labels.
INPUTS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_weights",
          "teacher_topk_ids", "teacher_topk_probs", "teacher_rest_prob")
# One prediction per example: top-1 id and its probability per masked position, next-sentence
# prediction, and the KL from the teacher summed over the real masked positions.
OUTPUTS = ("top1", "confidence", "nsp", "kl")

Row = tuple[np.ndarray, np.ndarray, np.int32, np.float32]
Predict = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, ...]]


def file_name(weights_sha256: str) -> str:
    return f"{FOLDER}/{weights_sha256}.npz"


def example_keys(batch: dict[str, np.ndarray]) -> list[bytes]:
    """A 16-byte blake2b per example of the arrays a prediction depends on (INPUTS)."""
    rows = len(batch[INPUTS[0]])
    parts = [np.ascontiguousarray(batch[name]).reshape(rows, -1).view(np.uint8) for name in INPUTS]
    joined = np.concatenate(parts, axis=1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in joined]


def to_bytes(keys: list[bytes], outputs: list[tuple[np.ndarray, ...]]) -> bytes:
    """An .npz of the keys and the per-batch outputs (OUTPUTS, batch-major) concatenated."""
    columns = {name: np.concatenate([batch[i] for batch in outputs]) for i, name in enumerate(OUTPUTS)}
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16), **columns)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict[bytes, Row]:
    with np.load(io.BytesIO(data)) as f:
        keys = [row.tobytes() for row in f["keys"]]
        columns = [f[name] for name in OUTPUTS]
    return {key: tuple(column[i] for column in columns) for i, key in enumerate(keys)}


class ReusingPredictor:
    """Batch predictions of one model where the rows found in `known` are copied and the others
    run `batch_size` at a time as they accumulate; `outputs()` returns them per batch, in the order
    the batches were added, as `predict` itself would have."""

    def __init__(self, predict: Predict, known: dict[bytes, Row], batch_size: int):
        self.predict, self.known, self.batch_size = predict, known, batch_size
        self.rows: list[list[Row | None]] = []
        self.pending: list[tuple[int, int, dict[str, np.ndarray]]] = []
        self.reused = 0

    def add(self, batch: dict[str, np.ndarray], keys: list[bytes]) -> None:
        found = [self.known.get(key) for key in keys]
        self.reused += sum(row is not None for row in found)
        number = len(self.rows)
        self.rows.append(found)
        self.pending += [(number, i, {name: batch[name][i] for name in INPUTS})
                         for i, row in enumerate(found) if row is None]
        while len(self.pending) >= self.batch_size:
            self._run()

    def _run(self) -> None:
        chunk, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # one batch shape, one trace
        results = self.predict({name: np.stack([row[name] for _, _, row in padded]) for name in INPUTS})
        for j, (number, i, _) in enumerate(chunk):
            self.rows[number][i] = tuple(result[j] for result in results)

    def outputs(self) -> list[tuple[np.ndarray, ...]]:
        if self.pending:
            self._run()
        return [tuple(np.stack(column) for column in zip(*rows, strict=True)) for rows in self.rows]


def previous(report_uri: str, weights_sha256: str) -> dict[bytes, Row]:
    """The predictions of the model with those weights that the report in `report_uri` kept; none
    when that report is unfinished, older than these files or about other models."""
    try:
        committed_input(report_uri, "evaluate")
    except StepError as exc:
        log.info("predictions: not reusing %s (%s)", report_uri, exc)
        return {}
    folder = open_folder(report_uri)
    name = file_name(weights_sha256)
    if not folder.exists(name):
        return {}
    try:
        return from_bytes(folder.read_bytes(name))
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:  # a cache: recomputed, never trusted
        log.warning("predictions: %s is unreadable (%s); the champion runs on every example",
                    folder.child_uri(name), exc)
        return {}
