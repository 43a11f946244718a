"""The four steps with every URI on a real S3 server: same bytes as on a local folder."""

from __future__ import annotations

import pytest

from bertdistill.store import open_folder
from tests.conftest import run_cli

pytestmark = pytest.mark.s3


def test_steps_on_s3_match_the_local_run(s3_env, s3_prefix, sample, corpus, tmp_path):
    store = open_folder(s3_prefix)
    env = {**s3_env, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    run_cli("fetch-dump", "--wiki", "enwiki", "--mirror", str(sample / "mirror"), "--output", f"{s3_prefix}/dumps",
            env=env, check=True)
    [dump] = [n for n in store.list("dumps/") if n.endswith(".bz2")]
    vocab = store.child_uri("vocab.txt")
    store.write_bytes("vocab.txt", (sample / "vocab.txt").read_bytes())
    run_cli("extract", "--input", store.child_uri(dump), "--output", f"{s3_prefix}/articles", env=env, check=True)
    run_cli("build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text",
            "--train-shards", "2", "--heldout-shards", "1", env=env, check=True)
    shard = "text/train/shard-00001.txt"
    run_cli("make-examples", "--input", store.child_uri(shard), "--output",
            f"{s3_prefix}/examples/shard-00001.tfrecord", "--vocab-file", vocab, "--dupe-factor", "1",
            env=env, check=True)

    local = tmp_path / "local"
    run_cli("make-examples", "--input", str(corpus / shard), "--output", str(local / "shard-00001.tfrecord"),
            "--vocab-file", str(sample / "vocab.txt"), "--dupe-factor", "1", check=True)
    assert store.read_bytes("examples/shard-00001.tfrecord") == (local / "shard-00001.tfrecord").read_bytes()
    for name in ("articles/part-00000.jsonl.gz", "text/train/shard-00000.txt", "text/heldout/shard-00000.txt"):
        assert store.read_bytes(name) == (corpus / name).read_bytes(), name
    assert store.exists("examples/_MANIFEST.shard-00001.tfrecord.json")
    assert store.sha256("text/train/shard-00001.txt") == open_folder(corpus).sha256("text/train/shard-00001.txt")

    again = run_cli("make-examples", "--input", store.child_uri(shard), "--output",
                    f"{s3_prefix}/examples/shard-00001.tfrecord", "--vocab-file", vocab, "--dupe-factor", "1",
                    env=env, check=True)
    assert "skipped" in again.stderr
    assert not list((tmp_path / "scratch").rglob("*.tfrecord")), "staged copies are cleaned up"
