"""The data steps called in-process on handwritten inputs: the fast layer under the end-to-end tests.

The end-to-end tests run each step as the container does (a CLI process on the real sample);
these call run() directly on a few documents, so a mistake in a step's logic shows up in a
second, named by the assertion rather than by a failing pipeline.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from bertdistill.errors import StepError
from bertdistill.manifest import FOLDER_MANIFEST, read_manifest
from bertdistill.records import read_pretraining
from bertdistill.steps import build_corpus, make_examples
from bertdistill.store import open_folder
from tests.conftest import commit_as

ARTICLES = [
    {"id": str(i), "title": f"Town {i}", "url": f"https://en.wikipedia.org/wiki?curid={i}",
     "text": f"Town {i} is a small town on a river. It has a bridge and a market.\n"
             f"The river floods in spring. Farmers grow wheat and barley near town {i}."}
    for i in range(1, 41)
]
WORDS = sorted({w.strip(".").lower() for a in ARTICLES for w in a["text"].split()})


def _articles(folder: Path, articles: list[dict]) -> str:
    """An articles folder as extract commits it (its part, then its manifest)."""
    folder.mkdir(parents=True)
    with gzip.open(folder / "part-00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(a) + "\n" for a in articles)
    commit_as("extract", folder)
    return str(folder)


def _corpus(tmp_path: Path, **params) -> tuple[Path, object]:
    inputs = [_articles(tmp_path / "a1", ARTICLES[:25]), _articles(tmp_path / "a2", ARTICLES[25:])]
    out = tmp_path / "text"
    manifest = build_corpus.run(build_corpus.BuildCorpusParams(input=inputs, output=str(out), train_shards=3,
                                                               heldout_shards=1, **params))
    return out, manifest


def _documents(path: Path) -> list[list[str]]:
    return [d.split("\n") for d in path.read_text().split("\n\n") if d.strip()]


def test_build_corpus_puts_each_document_whole_in_exactly_one_shard(tmp_path):
    out, manifest = _corpus(tmp_path)
    docs = {p.relative_to(out).as_posix(): _documents(p) for p in sorted(out.rglob("shard-*.txt"))}
    assert sorted(docs) == ["heldout/shard-00000.txt", *[f"train/shard-{i:05d}.txt" for i in range(3)]]
    firsts = [d[0] for shard in docs.values() for d in shard]
    assert sorted(firsts) == sorted(f"Town {i} is a small town on a river." for i in range(1, 41))
    assert all(len(d) == 4 for shard in docs.values() for d in shard)  # 2 paragraphs x 2 sentences, together
    for name, shard in docs.items():
        split, index = name.split("/")[0], int(name[-9:-4])
        for d in shard:
            assert build_corpus.shard_of(d[0].split()[1], 3, 1) == (split, index)
    assert manifest.summary["documents"] == 40 and manifest.summary["sentences"] == 160
    assert read_manifest(open_folder(str(out)), FOLDER_MANIFEST) is not None


def test_build_corpus_reruns_as_a_no_op_and_refuses_an_empty_input(tmp_path):
    out, first = _corpus(tmp_path)
    stamp = (out / "train" / "shard-00000.txt").stat().st_mtime_ns
    again = build_corpus.run(build_corpus.BuildCorpusParams(input=[str(tmp_path / "a1"), str(tmp_path / "a2")],
                                                            output=str(out), train_shards=3, heldout_shards=1))
    assert again.summary == first.summary
    assert (out / "train" / "shard-00000.txt").stat().st_mtime_ns == stamp  # not written again
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match=r"holds no part-\*\.jsonl\.gz articles: run extract"):
        build_corpus.run(build_corpus.BuildCorpusParams(input=[str(tmp_path / "empty")], output=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def _vocab(tmp_path: Path) -> str:
    path = tmp_path / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS, *map(str, range(10)),
              *(f"##{d}" for d in range(10))]
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return str(path)


def test_make_examples_writes_the_masked_lm_schema_and_depends_only_on_its_seed(tmp_path):
    out, _ = _corpus(tmp_path)
    vocab = _vocab(tmp_path)

    def make(name: str, seed: int) -> Path:
        target = tmp_path / name / "shard.tfrecord"
        make_examples.run(make_examples.MakeExamplesParams(
            input=str(out / "train" / "shard-00000.txt"), output=str(target), vocab_file=vocab, max_seq_length=32,
            max_predictions_per_seq=5, dupe_factor=2, random_seed=seed, workers=1))
        return target

    first, same, other = make("a", 1), make("b", 1), make("c", 2)
    assert first.read_bytes() == same.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    with open(first, "rb") as f:
        examples = list(read_pretraining(f))
    assert examples
    for ex in examples:
        assert ex["input_ids"].shape == (32,) and ex["masked_lm_positions"].shape == (5,)
        n = int(ex["input_mask"].sum())
        assert ex["input_ids"][0] == 2 and ex["input_ids"][n - 1] == 3  # [CLS] ... [SEP]
        assert not ex["input_ids"][n:].any()
        real = ex["masked_lm_weights"] > 0
        assert 1 <= real.sum() <= 5
        assert np.all(ex["masked_lm_positions"][real] < n)
        assert int(ex["next_sentence_labels"][0]) in (0, 1)


def test_make_examples_refuses_a_missing_vocab_and_leaves_nothing(tmp_path):
    out, _ = _corpus(tmp_path)
    target = tmp_path / "ex" / "shard.tfrecord"
    with pytest.raises(StepError, match=r"none\.txt does not exist: check the URI"):
        make_examples.run(make_examples.MakeExamplesParams(
            input=str(out / "train" / "shard-00000.txt"), output=str(target), vocab_file=str(tmp_path / "none.txt")))
    assert not target.exists()
