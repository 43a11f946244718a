"""S3 under faults: a proxy on 127.0.0.1 between the steps and a real S3 server resets connections."""

from __future__ import annotations

import os

import pytest

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
    direct.put_object(Bucket=bucket, Key=f"{prefix}/articles/part-00000.jsonl.gz", Body=part.read_bytes())
    direct.put_object(Bucket=bucket, Key=f"{prefix}/vocab.txt", Body=(sample / "vocab.txt").read_bytes())
    env = {**s3_env, "BERTDISTILL_S3_ENDPOINT_URL": proxy.url, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    for run in range(10):
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
    assert proxy.cuts_done >= 10  # resets did happen, in reads (build-corpus) and downloads (make-examples)


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
    direct.put_object(Bucket=bucket, Key=f"{prefix}/articles/part-00000.jsonl.gz", Body=part.read_bytes())
    proxy.reset_after(300_000, times=1)
    proxy.die_on_cut = True
    env = {**s3_env, "BERTDISTILL_S3_ENDPOINT_URL": proxy.url, "BERTDISTILL_SCRATCH": str(tmp_path / "scratch")}
    proc = run_cli("build-corpus", "--input", f"{s3_prefix}/articles", "--output", f"{s3_prefix}/text",
                   "--train-shards", "2", env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = error_lines(proc)
    assert "reading s3://" in line and "part-00000.jsonl.gz" in line and "broke off at byte" in line, line
    assert "Traceback" not in proc.stderr
