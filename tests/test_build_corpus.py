"""build-corpus: the text format, whole documents per shard, stable train/held-out split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from bertdistill.steps.build_corpus import shard_of, split_sentences
from tests.conftest import commit_as, error_lines, run_cli


def _docs(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n\n"), "every document ends with a blank line"
    return [block.split("\n") for block in text.strip("\n").split("\n\n") if block]


def test_format_and_whole_documents(corpus):
    text = corpus / "text"
    shards = sorted(text.glob("*/shard-*.txt"))
    assert [p.relative_to(text).as_posix() for p in shards] == [
        "heldout/shard-00000.txt", "train/shard-00000.txt", "train/shard-00001.txt"]
    manifest = json.loads((text / "_MANIFEST.json").read_text())
    documents = [doc for shard in shards for doc in _docs(shard)]
    assert len(documents) == manifest["summary"]["documents"] == 105
    for doc in documents:
        assert all(line.strip() == line and line for line in doc)
    # A document is never cut: each article's sentences are exactly one document of its shard.
    with gzip.open(corpus / "articles" / "part-00000.jsonl.gz", "rt") as f:
        articles = [json.loads(line) for line in f]
    for article in articles:
        side, index = shard_of(article["id"], 2, 1)
        docs = _docs(text / side / f"shard-{index:05d}.txt")
        assert docs.count(split_sentences(article["text"], "en", 2)) == 1, article["title"]
    assert not any(line.startswith("<") and line.endswith(">") for doc in documents for line in doc)
    assert sum(len(d) for d in documents) == manifest["summary"]["sentences"] > 15_000


def test_split_is_stable_when_the_dump_grows(corpus, tmp_path):
    """Shards of a dump with fewer articles hold exactly the same documents, in order."""
    small = tmp_path / "small_articles"
    small.mkdir()
    with gzip.open(corpus / "articles" / "part-00000.jsonl.gz", "rt") as f:
        lines = f.readlines()
    with gzip.open(small / "part-00000.jsonl.gz", "wt") as f:
        f.writelines(lines[::2])
    commit_as("extract", small)
    run_cli("build-corpus", "--input", str(small), "--output", str(tmp_path / "text"),
            "--train-shards", "2", "--heldout-shards", "1", check=True)
    for shard in sorted((tmp_path / "text").glob("*/shard-*.txt")):
        part = _docs(shard)
        full = _docs(corpus / "text" / shard.relative_to(tmp_path / "text"))
        assert part and all(doc in full for doc in part)


def test_no_articles_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("build-corpus", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "text"))
    assert proc.returncode == 2 and "run extract on its dump file first" in error_lines(proc)[0]
    assert not (tmp_path / "text").exists()


def test_several_article_folders_read_as_one_and_nothing_beside_them(corpus, tmp_path):
    """The DAG passes one folder per selected dump file: the text is that of those files only,
    whatever else lies in their parent (a full run's other files, seen from a trial)."""
    with gzip.open(corpus / "articles" / "part-00000.jsonl.gz", "rt") as f:
        lines = f.readlines()
    for name, part in (("file1", lines[::2]), ("file2", lines[1::2]), ("file3", lines[:5])):
        (tmp_path / "articles" / name).mkdir(parents=True)
        with gzip.open(tmp_path / "articles" / name / "part-00000.jsonl.gz", "wt") as f:
            f.writelines(part)
        commit_as("extract", tmp_path / "articles" / name)
    both = tmp_path / "both"
    run_cli("build-corpus", "--input", str(tmp_path / "articles" / "file1"), str(tmp_path / "articles" / "file2"),
            "--output", str(both), "--train-shards", "2", "--heldout-shards", "1", check=True)
    for shard in sorted(both.glob("*/shard-*.txt")):
        assert sorted(map(tuple, _docs(shard))) == sorted(map(tuple, _docs(corpus / "text" / shard.relative_to(both))))
    manifest = json.loads((both / "_MANIFEST.json").read_text())
    assert manifest["summary"]["documents"] == 105 and len(manifest["inputs"]) == 2


def test_new_and_changed_articles_are_split_between_training_and_the_temporal_shard(corpus, tmp_path):
    """Against last month's articles, half of the new or changed ones bound for training are held out in
    temporal/shard-00000.txt; unchanged articles and the held-out split stay where they were."""
    from bertdistill.steps.build_corpus import goes_to_temporal

    with gzip.open(corpus / "articles" / "part-00000.jsonl.gz", "rt") as f:
        articles = [json.loads(line) for line in f]
    last = tmp_path / "last_month"
    last.mkdir()
    kept, edited = articles[:60], articles[60:90]  # articles[90:] are new this month
    with gzip.open(last / "part-00000.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(a) + "\n" for a in kept + [a | {"text": a["text"] + "\nAn old sentence."}
                                                           for a in edited])
    commit_as("extract", last)
    proc = run_cli("build-corpus", "--input", str(corpus / "articles"), "--output", str(tmp_path / "text"),
                   "--train-shards", "2", "--heldout-shards", "1", "--previous", str(last), check=True)
    text = tmp_path / "text"
    temporal = _docs(text / "temporal" / "shard-00000.txt")
    summary = json.loads((text / "_MANIFEST.json").read_text())["summary"]
    changed = [a for a in articles[60:] if split_sentences(a["text"], "en", 2)]
    assert summary["new_or_changed_documents"] == len(changed)
    expected = [a for a in changed if shard_of(a["id"], 2, 1)[0] == "train" and goes_to_temporal(a["id"])]
    assert 0 < len(expected) < len(changed) / 2 + 10
    assert summary["temporal_documents"] == len(temporal) == len(expected)
    assert all(split_sentences(a["text"], "en", 2) in temporal for a in expected)
    for name in ("heldout/shard-00000.txt", "train/shard-00000.txt", "train/shard-00001.txt"):
        before, after = _docs(corpus / "text" / name), _docs(text / name)
        assert all(doc in before for doc in after)  # nothing moved between shards; only temporal ones left
    assert _docs(text / "heldout/shard-00000.txt") == _docs(corpus / "text" / "heldout/shard-00000.txt")
    assert "held out in the temporal shard" in proc.stdout
    # the other half train, and are copied to the fresh shard a warm start draws from
    fresh = _docs(text / "fresh" / "shard-00000.txt")
    trained = [split_sentences(a["text"], "en", 2) for a in changed
               if shard_of(a["id"], 2, 1)[0] == "train" and not goes_to_temporal(a["id"])]
    assert summary["fresh_documents"] == len(fresh) == len(trained) > 0
    assert sorted(fresh) == sorted(trained)
    assert all(doc in _docs(text / "train/shard-00000.txt") + _docs(text / "train/shard-00001.txt") for doc in fresh)
    assert summary["documents"] == len(articles) - len(
        [a for a in articles if not split_sentences(a["text"], "en", 2)])  # copies are not counted twice
