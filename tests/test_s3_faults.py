"""S3 under faults: a proxy on 127.0.0.1 between the steps and a real S3 server resets connections."""

from __future__ import annotations

import logging
import os
import re

import pytest

from bertdistill import s3_reads
from bertdistill.errors import TransientError
from bertdistill.store import open_folder
from tests.conftest import _s3_client, error_lines, run_cli
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.s3


@pytest.fixture
def proxy(s3_env, monkeypatch):
    upstream = int(s3_env["BERTDISTILL_S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    fault = FaultProxy(upstream)
    monkeypatch.setenv("BERTDISTILL_S3_ENDPOINT_URL", fault.url)
    yield fault
    fault.close()


def test_a_read_reset_mid_stream_resumes_from_the_byte_reached(s3_env, s3_prefix, proxy):
    data = os.urandom(3 << 20)
    direct = _s3_client(s3_env)
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    direct.put_object(Bucket=bucket, Key=f"{prefix}/blob", Body=data)
    proxy.reset_after(700_000, times=3)
    assert open_folder(s3_prefix).read_bytes("blob") == data
    assert proxy.cuts_done == 3  # three resets happened, and were read through


def test_build_corpus_and_make_examples_through_resets_give_the_same_bytes(s3_env, s3_prefix, proxy, corpus,
                                                                            sample, tmp_path):
    store = open_folder(s3_prefix)
    direct = _s3_client(s3_env)
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    part = corpus / "articles" / "part-00000.jsonl.gz"
    for name in ("part-00000.jsonl.gz", "_MANIFEST.json"):  # extract's finished output
        direct.put_object(Bucket=bucket, Key=f"{prefix}/articles/{name}", Body=(part.parent / name).read_bytes())
    direct.put_object(Bucket=bucket, Key=f"{prefix}/vocab.txt", Body=(sample / "vocab.txt").read_bytes())
    env = {**s3_env, "BERTDISTILL_S3_ENDPOINT_URL": proxy.url, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    for run in range(4):
        proxy.reset_after(200_000, times=2)
        run_cli("build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text-{run}",
                "--train-shards", "2", "--heldout-shards", "1", env=env, check=True)
        run_cli("make-examples", "--input", store.child_uri(f"text-{run}/train/shard-00001.txt"), "--output",
                f"{s3_prefix}/examples-{run}/shard-00001.tfrecord", "--vocab-file", store.child_uri("vocab.txt"),
                "--dupe-factor", "1", env=env, check=True)
        for name in ("train/shard-00000.txt", "train/shard-00001.txt", "heldout/shard-00000.txt"):
            assert store.read_bytes(f"text-{run}/{name}") == (corpus / "text" / name).read_bytes(), (run, name)
        if run:
            assert (store.read_bytes(f"examples-{run}/shard-00001.tfrecord")
                    == store.read_bytes("examples-0/shard-00001.tfrecord"))
    assert proxy.cuts_done >= 4  # resets did happen, in reads (build-corpus) and downloads (make-examples)


def test_an_endpoint_dying_during_an_upload_names_the_upload_and_the_rerun_leaves_no_parts(s3_env, s3_prefix, proxy):
    """The step's error line names the write that failed (not the clean-up after it); the
    unfinished multipart upload is aborted by the next run of the step."""
    from bertdistill.errors import StepError
    from bertdistill.manifest import run_step

    out = open_folder(s3_prefix).join("out")
    data = os.urandom(24 << 20)  # over boto3's 8 MB multipart threshold

    def work(writer):
        writer.write_bytes("small.bin", b"committed first")
        writer.write_bytes("big.bin", data)
        return {}

    proxy.up_limit = 12 << 20  # the endpoint goes away half-way through the big upload
    with pytest.raises(StepError) as failed:
        run_step("upload", {}, {}, out, work)
    # the first failure, not the failed removal of small.bin that followed it
    assert "writing s3://" in str(failed.value) and "big.bin" in str(failed.value)
    assert "deleting" not in str(failed.value)
    proxy.revive()
    direct = _s3_client(s3_env)
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    assert direct.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads"), "no upload was left to abort"
    run_step("upload", {}, {}, out, work)
    assert out.read_bytes("big.bin") == data
    left = direct.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert left == []


def test_a_dead_endpoint_mid_read_is_one_transient_error_line(s3_env, s3_prefix, proxy, corpus, tmp_path):
    """Not `EOFError: Compressed file ended...`, which reads like a corrupt input: the read that
    broke, where, and that a retry may pass (exit 1, so Airflow retries)."""
    direct = _s3_client(s3_env)
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    part = corpus / "articles" / "part-00000.jsonl.gz"
    for name in ("part-00000.jsonl.gz", "_MANIFEST.json"):  # extract's finished output
        direct.put_object(Bucket=bucket, Key=f"{prefix}/articles/{name}", Body=(part.parent / name).read_bytes())
    proxy.reset_after(300_000, times=1)
    proxy.die_on_cut = True
    env = {**s3_env, "BERTDISTILL_S3_ENDPOINT_URL": proxy.url, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    proc = run_cli("build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text",
                   "--train-shards", "2", env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = error_lines(proc)
    assert "reading s3://" in line and "part-00000.jsonl.gz" in line and "broke off at byte" in line, line
    assert "cannot reach the endpoint" in line and "at byte 0 of" not in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _put(s3_env, s3_prefix, name: str, data: bytes) -> None:
    bucket, _, prefix = s3_prefix.removeprefix("s3://").partition("/")
    _s3_client(s3_env).put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


@pytest.mark.parametrize("every", [200_000, 500_000])
def test_a_link_that_resets_every_connection_is_read_through(s3_env, s3_prefix, proxy, every, caplog):
    """Each connection's bytes count, less at most one short read: the object comes through in
    about size/every connections, however many resets that takes. Read in 1 MiB blocks, as
    gzip's buffered reads and copyfileobj ask for them."""
    data = os.urandom(2_500_000)
    _put(s3_env, s3_prefix, "blob", data)
    proxy.reset_every(every)
    with caplog.at_level(logging.WARNING, logger="bertdistill.s3_reads"), open_folder(s3_prefix).open_read("blob") as f:
        assert b"".join(iter(lambda: f.read(1 << 20), b"")) == data
    assert proxy.connections <= len(data) / every + 2, proxy.connections
    assert proxy.cuts_done >= len(data) // every
    assert proxy.bytes_down <= len(data) + proxy.connections * (s3_reads.READ_PIECE + 2_000), proxy.bytes_down
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings and all("reset at byte" in w and " at byte 0 of" not in w for w in warnings), warnings


def test_build_corpus_through_a_link_that_resets_every_connection_gives_the_same_bytes(s3_env, s3_prefix, proxy,
                                                                                       corpus, tmp_path):
    """Every connection reset after 500,000 bytes (less than the article part): build-corpus on
    the sample completes, byte-identical."""
    part = corpus / "articles" / "part-00000.jsonl.gz"
    for name in ("part-00000.jsonl.gz", "_MANIFEST.json"):  # extract's finished output
        _put(s3_env, s3_prefix, f"articles/{name}", (part.parent / name).read_bytes())
    assert part.stat().st_size > 500_000
    env = {**s3_env, "BERTDISTILL_S3_ENDPOINT_URL": proxy.url, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    proxy.reset_every(500_000)
    run_cli("build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text",
            "--train-shards", "2", "--heldout-shards", "1", env=env, check=True)
    assert proxy.cuts_done >= 1
    proxy.reset_after(0, times=0)
    store = open_folder(s3_prefix)
    for name in ("train/shard-00000.txt", "train/shard-00001.txt", "heldout/shard-00000.txt"):
        assert store.read_bytes(f"text/{name}") == (corpus / "text" / name).read_bytes(), name


def test_the_warnings_after_the_endpoint_dies_say_it_cannot_be_reached(s3_env, s3_prefix, proxy, caplog,
                                                                        monkeypatch):
    """Not "broke off at byte 0 ... 0 read": the reset names the byte reached, each failed resume
    the endpoint, and the final error the object and that byte."""
    monkeypatch.setattr(s3_reads, "RESUME_PAUSE_S", 0.05)
    data = os.urandom(1_000_000)
    _put(s3_env, s3_prefix, "blob", data)
    proxy.reset_after(300_000, times=1)
    proxy.die_on_cut = True
    with caplog.at_level(logging.WARNING, logger="bertdistill.s3_reads"), pytest.raises(TransientError) as failed:
        open_folder(s3_prefix).read_bytes("blob")
    first, *rest = [r.getMessage() for r in caplog.records]
    reached = int(re.search(r"reset at byte ([\d,]+) of 1,000,000", first)[1].replace(",", ""))
    assert 300_000 - s3_reads.READ_PIECE - 2_000 < reached < 300_000, first
    assert rest and all(f"cannot reach the endpoint {proxy.url}" in w for w in rest), rest
    error = str(failed.value)
    assert "\n" not in error and f"{s3_prefix}/blob" in error and f"at byte {reached:,} of 1,000,000" in error, error
    assert "cannot reach the endpoint" in error and "a retry may pass" in error, error


def test_an_object_replaced_mid_read_is_not_spliced_onto_the_old_one(s3_env, s3_prefix, proxy):
    """The resume asks If-Match the first ETag: a new object under the key fails the read at
    once, saying so, instead of handing back the old one's head on the new one's tail."""
    _put(s3_env, s3_prefix, "blob", os.urandom(8 << 20))
    with open_folder(s3_prefix).open_read("blob") as f:
        f.read(1000)
        proxy.kill()
        proxy.revive()
        _put(s3_env, s3_prefix, "blob", os.urandom(8 << 20))
        with pytest.raises(TransientError, match=r"the object changed \(ETag .* no longer matches\)"):
            f.read()


def test_shards_left_by_an_endpoint_dying_mid_upload_are_refused_until_the_rerun(s3_env, s3_prefix, proxy, corpus,
                                                                                  sample, tmp_path):
    """The endpoint dies while build-corpus uploads its second shard: the first stays in the store (the
    clean-up cannot reach it either) without build-corpus's manifest. make-examples, run on it by hand
    before the rerun, refuses it in one line; after the rerun it reads it."""
    part = corpus / "articles" / "part-00000.jsonl.gz"
    for name in ("part-00000.jsonl.gz", "_MANIFEST.json"):  # extract's finished output
        _put(s3_env, s3_prefix, f"articles/{name}", (part.parent / name).read_bytes())
    _put(s3_env, s3_prefix, "vocab.txt", (sample / "vocab.txt").read_bytes())
    env = {**s3_env, "BERTDISTILL_S3_ENDPOINT_URL": proxy.url, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    # the shards are committed last first (held-out, then train 1): the endpoint dies half-way through train 1
    sizes = [(corpus / "text" / n).stat().st_size for n in ("heldout/shard-00000.txt", "train/shard-00001.txt")]
    proxy.up_limit = proxy.up_bytes + sizes[0] + sizes[1] // 2  # the articles' GET is a few hundred bytes up
    build = ["build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text",
             "--train-shards", "2", "--heldout-shards", "1"]
    failed = run_cli(*build, env=env, timeout=300)
    assert failed.returncode != 0 and "train/shard-00001.txt" in error_lines(failed)[0], failed.stderr[-2000:]
    proxy.revive()
    store = open_folder(s3_prefix)
    assert store.list("text") == ["text/heldout/shard-00000.txt"], failed.stderr[-3000:]  # left, no manifest
    shard = store.child_uri("text/heldout/shard-00000.txt")
    examples = ["make-examples", "--input", shard, "--output", f"{s3_prefix}/examples/shard-00000.tfrecord",
                "--vocab-file", store.child_uri("vocab.txt"), "--dupe-factor", "1"]
    refused = run_cli(*examples, env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = error_lines(refused)
    assert f"{s3_prefix}/text" in line and "_MANIFEST.json" in line and "run build-corpus again" in line, line
    assert not store.list("examples")
    run_cli(*build, env=env, check=True)
    run_cli(*examples, env=env, check=True)
    assert store.read_bytes("text/heldout/shard-00000.txt") == (corpus / "text/heldout/shard-00000.txt").read_bytes()
