"""Local scratch stays bounded by a setting (the upload part size), whatever the input size."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from bertdistill.store import open_folder
from tests.conftest import _s3_client, commit_as, run_cli
from tests.scratch_peak import ScratchPeak

pytestmark = pytest.mark.s3
PART_MB = 5  # S3's smallest part


def _articles(corpus: Path, copies: int) -> bytes:
    """The sample's articles `copies` times over, each copy under fresh ids (new documents)."""
    with gzip.open(corpus / "articles" / "part-00000.jsonl.gz", "rt") as f:
        articles = [json.loads(line) for line in f]
    lines = [json.dumps(a | {"id": f"{a['id']}-{c}"}) + "\n" for c in range(copies) for a in articles]
    return gzip.compress("".join(lines).encode())


@pytest.mark.parametrize("copies", [1, 8])
def test_build_corpus_on_s3_holds_a_part_per_shard_not_the_corpus(s3_env, s3_prefix, corpus, tmp_path, copies):
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    _s3_client(s3_env).put_object(Bucket=bucket, Key=f"{prefix}/articles/part-00000.jsonl.gz",
                                  Body=_articles(corpus, copies))
    commit_as("extract", f"{s3_prefix}/articles")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**s3_env, "BERTDISTILL_SCRATCH": str(scratch), "BERTDISTILL_UPLOAD_PART_MB": str(PART_MB)}
    with ScratchPeak(scratch) as watch:
        run_cli("build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text",
                "--train-shards", "2", "--heldout-shards", "1", env=env, check=True)
    store = open_folder(s3_prefix)
    text = sum(store.size(f"text/{n}") for n in ("train/shard-00000.txt", "train/shard-00001.txt",
                                                  "heldout/shard-00000.txt"))
    assert watch.peak <= 3 * (PART_MB << 20) + (1 << 20), (watch.peak, text)  # 3 shards, one part each
    if copies == 8:
        assert text > 3 * (PART_MB << 20)  # more than the bound: the shards went up in several parts
    manifest = json.loads(store.read_bytes("text/_MANIFEST.json"))
    text_folder = store.join("text")
    for name, entry in manifest["outputs"].items():
        assert text_folder.sha256(name) == entry["sha256"] and text_folder.size(name) == entry["bytes"]


def test_a_streamed_upload_that_fails_leaves_no_object_and_no_parts(s3_env, s3_prefix, tmp_path, monkeypatch):
    from bertdistill.manifest import run_step

    monkeypatch.setenv("BERTDISTILL_UPLOAD_PART_MB", str(PART_MB))
    monkeypatch.setenv("BERTDISTILL_SCRATCH", str(tmp_path / "scratch"))
    out = open_folder(s3_prefix).join("out")

    def work(writer):
        with writer.stream("big.bin") as f:
            f.write(os.urandom(12 << 20))  # two parts uploaded
            raise RuntimeError("the step failed while writing")

    with pytest.raises(RuntimeError, match="while writing"):
        run_step("stream", {}, {}, out, work)
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    client = _s3_client(s3_env)
    assert not out.exists("big.bin")
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    assert not any(p.is_file() for p in (tmp_path / "scratch").rglob("*"))
