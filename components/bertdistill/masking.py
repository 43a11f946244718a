"""Masked-LM rows for a batch of segment pairs, each row drawn from its own 64-bit seed.

Google's create_pretraining_data masks from one generator, so a row's masks depend on every row
before it. Here each row's draws come from a counter-based generator (SplitMix64 over its seed),
vectorised over the batch with numpy: a row is masked the same in any batch, any chunk and any
month, which is what lets label-teacher reuse last month's labels of an unchanged article.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np

from bertdistill.records import PretrainingBatch


class MaskSettings(Protocol):
    """What masking reads of make-examples' per-worker context."""

    L: int
    P: int
    masked_lm_prob: float
    whole_word: bool
    vocab_tokens: list[str]
    special: tuple[int, int, int]  # cls, sep, mask
    continuation: np.ndarray  # per vocab id: a "##" piece


GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: uint64 -> uint64, each output bit depending on every input bit
    (a counter-based generator: a row's draws follow from its seed alone, in any batch)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seeds: np.ndarray, stream: int, width: int) -> np.ndarray:
    """[len(seeds), width] floats in [0, 1): row r from seeds[r] alone, a separate stream per use."""
    with np.errstate(over="ignore"):  # SplitMix64's sequence from each seed, from draw stream << 32 on
        counters = (np.arange(width, dtype=np.uint64) + np.uint64(stream << 32)) * GOLDEN
        bits = mix64(seeds[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def mask_batch(table: np.ndarray, seeds: np.ndarray, flat: np.ndarray, ctx: MaskSettings) -> PretrainingBatch:
    """[CLS] A [SEP] B [SEP] rows, padded, with masked-LM predictions, for a batch of instances;
    each row's masking drawn from its own seed."""
    cls_id, sep_id, mask_id = ctx.special
    L, P = ctx.L, ctx.P
    a_start, la, b_start, lb, is_random = (table[:, c] for c in range(5))
    n = len(table)
    rows = np.arange(n)
    j = np.arange(L)[None, :]
    la_, lb_ = la[:, None], lb[:, None]
    in_a = (j >= 1) & (j <= la_)
    in_b = (j >= la_ + 2) & (j < la_ + 2 + lb_)
    candidate = in_a | in_b
    source = np.where(in_a, a_start[:, None] + j - 1, b_start[:, None] + j - la_ - 2)
    ids = np.where(candidate, flat[np.clip(source, 0, len(flat) - 1)], 0).astype(np.int64)
    ids[:, 0] = cls_id
    ids[rows, la + 1] = sep_id
    ids[rows, la + lb + 2] = sep_id
    n_tokens = la + lb + 3
    input_mask = j < n_tokens[:, None]
    segment_ids = (j >= la_ + 2) & input_mask
    to_predict = np.minimum(P, np.maximum(1, np.round(n_tokens * ctx.masked_lm_prob).astype(np.int64)))

    if ctx.whole_word:
        positions = whole_word_positions(ids, candidate, to_predict, ctx, seeds)
    else:
        keys = uniform(seeds, 0, L)
        keys[~candidate] = 2.0
        order = np.argsort(keys, axis=1)[:, :P]
        picked = (np.arange(P)[None, :] < to_predict[:, None]) & (np.take_along_axis(keys, order, 1) < 2.0)
        positions = np.where(picked, order, L)
    positions.sort(axis=1)
    valid = positions < L
    positions = np.where(valid, positions, 0)
    original = np.take_along_axis(ids, positions, 1)
    draw = uniform(seeds, 1, P)
    keep = uniform(seeds, 2, P) < 0.5
    random_ids = (uniform(seeds, 3, P) * len(ctx.vocab_tokens)).astype(np.int64)
    replacement = np.where(draw < 0.8, mask_id, np.where(keep, original, random_ids))
    r, c = np.nonzero(valid)
    ids[r, positions[r, c]] = replacement[r, c]
    return PretrainingBatch(
        input_ids=ids,
        input_mask=input_mask,
        segment_ids=segment_ids,
        masked_lm_positions=positions,
        masked_lm_ids=np.where(valid, original, 0),
        masked_lm_weights=valid.astype(np.float32),
        next_sentence_labels=is_random,
    )


def whole_word_positions(ids: np.ndarray, candidate: np.ndarray, to_predict: np.ndarray, ctx: MaskSettings,
                          seeds: np.ndarray) -> np.ndarray:
    """Google's whole-word masking: shuffle words, take whole words while they fit."""
    L, P = ctx.L, ctx.P
    positions = np.full((len(ids), P), L, dtype=np.int64)
    continuation = ctx.continuation[ids] & candidate
    for r in range(len(ids)):
        words: list[list[int]] = []
        for p in np.flatnonzero(candidate[r]).tolist():
            if continuation[r, p] and words and words[-1][-1] == p - 1:
                words[-1].append(p)
            else:
                words.append([p])
        random.Random(int(seeds[r])).shuffle(words)
        chosen: list[int] = []
        limit = int(to_predict[r])
        for word in words:
            if len(chosen) >= limit:
                break
            if len(chosen) + len(word) > limit:
                continue
            chosen.extend(word)
        positions[r, : len(chosen)] = chosen
    return positions
