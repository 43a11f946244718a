"""make-examples: parsed by TensorFlow's own reader, with Google's example semantics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bertdistill.records import pretraining_shapes, read_pretraining
from bertdistill.tfrecord import read_records
from bertdistill.tokenization import Vocab, wordpiece_tokenizer
from tests.conftest import commit_as, error_lines, run_cli

L, P = 128, 20


@pytest.fixture(scope="module")
def examples(tmp_path_factory, all_text, sample) -> Path:
    out = tmp_path_factory.mktemp("examples") / "shard-00000.tfrecord"
    run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file",
            str(sample / "vocab.txt"), "--dupe-factor", "2", check=True)
    return out


@pytest.fixture(scope="module")
def arrays(examples) -> dict[str, np.ndarray]:
    with open(examples, "rb") as f:
        rows = list(read_pretraining(f, str(examples)))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def vocab(sample) -> Vocab:
    return Vocab(sample / "vocab.txt")


def test_tensorflow_parses_every_record_with_the_design_schema(examples, arrays):
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([n], tf.int64 if dtype == "int64" else tf.float32)
            for name, (dtype, n) in pretraining_shapes(L, P).items()}
    dataset = tf.data.TFRecordDataset(str(examples)).map(lambda r: tf.io.parse_single_example(r, spec))
    count = 0
    for i, example in enumerate(dataset.batch(1024)):
        for name in spec:
            np.testing.assert_array_equal(example[name].numpy(), arrays[name][i * 1024 : (i + 1) * 1024])
        count += len(example["input_ids"])
    manifest = json.loads((examples.parent / "_MANIFEST.shard-00000.tfrecord.json").read_text())
    assert count == len(arrays["input_ids"]) == manifest["outputs"]["shard-00000.tfrecord"]["records"] > 10_000
    assert manifest["summary"]["vocab_sha256"] and manifest["params"]["dupe_factor"] == 2


def _originals(arrays) -> np.ndarray:
    ids = arrays["input_ids"].copy()
    rows, cols = np.nonzero(arrays["masked_lm_weights"])
    ids[rows, arrays["masked_lm_positions"][rows, cols]] = arrays["masked_lm_ids"][rows, cols]
    return ids


def test_sequence_layout_matches_google(arrays, vocab):
    ids, mask, seg = _originals(arrays), arrays["input_mask"], arrays["segment_ids"]
    lengths = mask.sum(axis=1)
    assert (lengths <= L).all() and (ids[:, 0] == vocab.cls_id).all()
    for r in range(0, len(ids), 37):
        n = lengths[r]
        assert (mask[r, :n] == 1).all() and (mask[r, n:] == 0).all() and (ids[r, n:] == 0).all()
        seps = np.flatnonzero(ids[r, :n] == vocab.sep_id)
        assert seps[-1] == n - 1 and len(seps) >= 2
        first_sep = seps[0]
        assert first_sep >= 2 and n - first_sep >= 3  # A and B both non-empty
        assert (seg[r, : first_sep + 1] == 0).all() and (seg[r, first_sep + 1 : n] == 1).all()
        assert (seg[r, n:] == 0).all()
    # A shorter target length 10% of the time, as short_seq_prob says.
    assert 0.03 < (lengths < L // 2).mean() < 0.25


def test_masking_counts_positions_and_80_10_10(arrays, vocab):
    ids, original = arrays["input_ids"], _originals(arrays)
    pos, weights = arrays["masked_lm_positions"], arrays["masked_lm_weights"]
    lengths = arrays["input_mask"].sum(axis=1)
    expected = np.minimum(P, np.maximum(1, np.round(lengths * 0.15))).astype(int)
    assert (weights.sum(axis=1) == expected).all()
    rows, cols = np.nonzero(weights)
    p = pos[rows, cols]
    assert (np.diff(np.where(weights > 0, pos, L + 1), axis=1)[weights[:, 1:] > 0] > 0).all()  # sorted, unique
    assert not np.isin(original[rows, p], [vocab.cls_id, vocab.sep_id]).any()
    assert (pos[weights == 0] == 0).all() and (arrays["masked_lm_ids"][weights == 0] == 0).all()
    now, was = ids[rows, p], original[rows, p]
    masked = (now == vocab.mask_id).mean()
    kept = ((now == was) & (now != vocab.mask_id)).mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - masked - kept - 0.1) < 0.01


def test_next_sentence_pairs(arrays, all_text, vocab):
    labels = arrays["next_sentence_labels"][:, 0]
    assert 0.45 < labels.mean() < 0.6
    tokenizer = wordpiece_tokenizer(vocab)
    documents = [d for d in all_text.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    doc_ids = [np.array([i for e in tokenizer.encode_batch(d.split("\n"), add_special_tokens=False)
                         for i in e.ids], dtype=np.int32).tobytes() for d in documents]
    original = _originals(arrays)
    checked = 0
    for r in range(0, len(labels), 97):
        n = arrays["input_mask"][r].sum()
        first_sep = int(np.flatnonzero(original[r] == vocab.sep_id)[0])
        a = original[r, 1:first_sep].astype(np.int32).tobytes()
        b = original[r, first_sep + 1 : n - 1].astype(np.int32).tobytes()
        if labels[r] == 0:  # the actual next segment: B follows A in the same document
            assert any(_find(doc, b, _find(doc, a) + len(a)) >= 0 for doc in doc_ids if _find(doc, a) >= 0)
        else:  # a random segment from another document
            assert any(_find(doc, a) >= 0 for doc in doc_ids) and any(_find(doc, b) >= 0 for doc in doc_ids)
            assert not any(_find(doc, a + b) >= 0 for doc in doc_ids)
        checked += 1
    assert checked > 100


def _find(haystack: bytes, needle: bytes, start: int = 0) -> int:
    """Offset of `needle` in `haystack` at an int32 boundary, or -1."""
    at = haystack.find(needle, start)
    while at != -1 and at % 4:
        at = haystack.find(needle, at + 1)
    return at


def test_output_is_the_same_for_any_number_of_workers(all_text, sample, tmp_path):
    outputs = []
    for workers, seed in ((1, 12345), (2, 12345), (2, 7)):
        out = tmp_path / f"w{workers}-{seed}.tfrecord"
        run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file",
                str(sample / "vocab.txt"), "--dupe-factor", "1", "--workers", str(workers),
                "--random-seed", str(seed), check=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_whole_word_masking_masks_whole_words(all_text, sample, tmp_path, vocab):
    out = tmp_path / "wwm.tfrecord"
    run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file",
            str(sample / "vocab.txt"), "--dupe-factor", "1", "--do-whole-word-mask", check=True)
    with open(out, "rb") as f:
        rows = list(read_pretraining(f))
    continuation = np.array(vocab.is_continuation())
    words_seen = 0
    for row in rows[::5]:
        ids = row["input_ids"].copy()
        live = row["masked_lm_weights"] > 0
        masked = set(row["masked_lm_positions"][live].tolist())
        ids[row["masked_lm_positions"][live]] = row["masked_lm_ids"][live]
        for p in masked:
            starts_sequence = ids[p - 1] in (vocab.cls_id, vocab.sep_id)  # a word cut by truncation
            if continuation[ids[p]] and not starts_sequence:  # a masked '##piece': so is the piece before
                assert p - 1 in masked
            if p + 1 < len(ids) and continuation[ids[p + 1]] and ids[p + 1] != 0:
                assert p + 1 in masked  # and the word's next piece
                words_seen += 1
    assert words_seen > 50


@pytest.mark.parametrize("extra, message", [
    (["--max-predictions-per-seq", "200"], "larger than --max-seq-length"),
    (["--masked-lm-prob", "1.5"], "--masked-lm-prob"),
    (["--dupe-factor", "0"], "--dupe-factor"),
])
def test_bad_parameters_are_refused_before_any_work(all_text, sample, tmp_path, extra, message):
    out = tmp_path / "o" / "x.tfrecord"
    proc = run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file",
                   str(sample / "vocab.txt"), *extra)
    assert proc.returncode == 2 and message in error_lines(proc)[0]
    assert not out.parent.exists()


def test_a_vocab_that_is_not_wordpiece_leaves_nothing(all_text, tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text('{"hello": 1, "world": 2}\n')
    out = tmp_path / "o" / "x.tfrecord"
    proc = run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file", str(bad))
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "vocab.json is not a WordPiece vocab" in line
    assert not out.exists() and not any(out.parent.glob("*")) if out.parent.exists() else True


def repeat_gaps(path: Path) -> tuple[np.ndarray, int]:
    """Records between consecutive examples that start at the same sentence (first segment's first 12
    tokens with the masked ones restored), and the record count."""
    with open(path, "rb") as f:
        rows = list(read_pretraining(f, str(path)))
    last: dict[tuple, int] = {}
    gaps = []
    for i, row in enumerate(rows):
        ids = row["input_ids"].copy()
        real = row["masked_lm_weights"] > 0
        ids[row["masked_lm_positions"][real]] = row["masked_lm_ids"][real]
        key = tuple(ids[1:13])
        if key in last:
            gaps.append(i - last[key])
        last[key] = i
    return np.array(gaps), len(rows)


def test_a_sentences_dupe_copies_are_spread_over_the_whole_shard(all_text, sample, tmp_path):
    """Google shuffles a shard's examples as a whole; a chunk-local shuffle kept the dupe_factor copies of
    a document within a few thousand consecutive records. Shuffled uniformly, copies of a sentence are
    about N / dupe_factor records apart."""
    out = tmp_path / "shard.tfrecord"
    run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file",
            str(sample / "vocab.txt"), "--dupe-factor", "5", check=True)
    gaps, n = repeat_gaps(out)
    assert len(gaps) > 1000 and n > 10_000
    assert np.median(gaps) > 0.5 * n / 5, (np.median(gaps), n)


def test_example_count_and_random_next_share_match_googles_script_on_the_sample(all_text, sample, tmp_path):
    """Google's create_pretraining_data.py on the same 105 sample documents at dupe 1, with
    short_seq_prob 0 (at 0.1 one seed's few long documents that draw a 3-token target yield
    hundreds of one-sentence, always random-next examples, so single seeds differ by +-5% in
    count and +-0.02 in share for either program, and by as much for Google's alone when only
    the file order changes): 5,237 examples (sd 32 over 300 seeds) and a random-next share of
    0.5054. The per-document logic was also compared draw for draw with Google's: identical, before
    draws were seeded per document (the random document by rendezvous hashing, its start and the
    pair's trim from one draw each), which keeps these statistics."""
    counts, shares = [], []
    for seed in (1, 2, 3):
        out = tmp_path / f"seed-{seed}.tfrecord"
        run_cli("make-examples", "--input", str(all_text), "--output", str(out), "--vocab-file",
                str(sample / "vocab.txt"), "--dupe-factor", "1", "--short-seq-prob", "0", "--random-seed",
                str(seed), check=True)
        with open(out, "rb") as f:
            labels = [int(r["next_sentence_labels"][0]) for r in read_pretraining(f, str(out))]
        counts.append(len(labels))
        shares.append(np.mean(labels))
    assert abs(np.mean(counts) / 5237 - 1) < 0.01, counts
    assert abs(np.mean(shares) - 0.5054) < 0.01, shares


def test_an_unchanged_article_makes_the_same_examples_next_month_in_the_same_order(all_text, sample, tmp_path):
    """Next month's text: one article edited, one deleted, one new. Every example of an unchanged
    article comes out byte for byte as this month (masking and the random next document drawn
    per document), and the shared examples keep their order, so the first N of next month's
    shard are nearly all this month's: what label-teacher's reuse of last month's labels needs."""
    docs = [d for d in all_text.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    edited = docs[10].split("\n")
    edited[0] = "This sentence was added to the article last week. " + edited[0]
    next_month = [*docs[:10], "\n".join(edited), *docs[11:40], *docs[41:], docs[5].replace("the", "a")]
    month_two = tmp_path / "text" / "train" / "month-two.txt"
    month_two.parent.mkdir(parents=True)
    month_two.write_text("\n\n".join(next_month) + "\n", encoding="utf-8")
    commit_as("build-corpus", tmp_path / "text")
    months = []
    for text in (all_text, month_two):
        out = tmp_path / f"{text.stem}.tfrecord"
        run_cli("make-examples", "--input", str(text), "--output", str(out), "--vocab-file",
                str(sample / "vocab.txt"), "--dupe-factor", "2", check=True)
        with open(out, "rb") as f:
            months.append(list(read_records(f)))
    one, two = months
    seen = set(one)
    shared = [r for r in two if r in seen]
    assert len(shared) / len(two) > 0.95, (len(shared), len(two))
    place = [{r: i for i, r in enumerate(one)}[r] for r in shared]
    assert place == sorted(place), "shared examples changed order"
    first = set(one[:2000])
    assert sum(r in first for r in two[:1000]) > 930
