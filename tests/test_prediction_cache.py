"""prediction_cache: copied rows plus rows run in full batches give what running every batch gives."""

from __future__ import annotations

import numpy as np

from bertdistill import prediction_cache as predictions

P, L = 3, 5


def _batch(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(0, 100, (rows, L), dtype=np.int32),
            "input_mask": np.ones((rows, L), np.int32), "segment_ids": np.zeros((rows, L), np.int32),
            "masked_lm_positions": rng.integers(0, L, (rows, P), dtype=np.int32),
            "masked_lm_weights": np.ones((rows, P), np.float32),
            "teacher_topk_ids": rng.integers(0, 100, (rows, P, 2), dtype=np.int32),
            "teacher_topk_probs": rng.random((rows, P, 2), dtype=np.float32),
            "teacher_rest_prob": rng.random((rows, P), dtype=np.float32)}


class Model:
    """A deterministic stand-in for a model's predict: each output a function of its own row."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        self.calls.append(len(batch["input_ids"]))
        ids = batch["input_ids"]
        top1 = np.take_along_axis(ids, batch["masked_lm_positions"], 1)
        return (top1, top1 / 100.0, ids.sum(1) % 2, batch["teacher_rest_prob"].sum(1))


def test_reused_and_recomputed_rows_agree_with_running_every_batch():
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 8) for _ in range(5)] + [_batch(rng, 3)]  # a short last batch, as a shard's
    model = Model()
    plain = [model(b) for b in batches]
    keys = [predictions.example_keys(b) for b in batches]
    saved = predictions.from_bytes(predictions.to_bytes([k for ks in keys for k in ks], plain))
    assert len(saved) == 43
    # Next month: every other example changed (not in the cache).
    known = {k: row for i, (k, row) in enumerate(saved.items()) if i % 2 == 0}
    again = Model()
    reusing = predictions.ReusingPredictor(again, known, batch_size=8)
    for b, k in zip(batches, keys, strict=True):
        reusing.add(b, k)
    out = reusing.outputs()
    assert reusing.reused == 22 and set(again.calls) == {8} and len(again.calls) == 3  # 21 misses, padded once
    for got, want in zip(out, plain, strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_a_changed_label_or_input_changes_the_key():
    batch = _batch(np.random.default_rng(1), 2)
    before = predictions.example_keys(batch)
    batch["teacher_rest_prob"][1, 0] += 0.5
    after = predictions.example_keys(batch)
    assert before[0] == after[0] and before[1] != after[1]


def test_an_unreadable_cache_is_recomputed_not_trusted(tmp_path):
    from tests.conftest import commit_as

    batch = _batch(np.random.default_rng(2), 4)
    keys = predictions.example_keys(batch)
    (tmp_path / "predictions").mkdir()
    good = predictions.to_bytes(keys, [Model()(batch)])
    (tmp_path / predictions.file_name("a" * 64)).write_bytes(good)
    (tmp_path / predictions.file_name("b" * 64)).write_bytes(good[: len(good) // 2])  # cut short
    assert predictions.previous(str(tmp_path), "a" * 64) == {}  # evaluate has not finished this report
    commit_as("evaluate", tmp_path)
    assert set(predictions.previous(str(tmp_path), "a" * 64)) == set(keys)
    assert predictions.previous(str(tmp_path), "b" * 64) == {}
    assert predictions.previous(str(tmp_path), "c" * 64) == {}  # another model's weights
