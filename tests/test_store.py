"""store.py and manifests, on a local folder and on a real S3 server."""

from __future__ import annotations

import pytest

from bertdistill.errors import StepError
from bertdistill.manifest import read_manifest, run_step
from bertdistill.s3store import S3Folder
from bertdistill.store import LocalFolder, open_folder, split_uri
from tests.conftest import error_lines, run_cli


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return open_folder(tmp_path / "store")
    return open_folder(request.getfixturevalue("s3_prefix"))


def test_factory_understands_every_uri_form(tmp_path):
    assert isinstance(open_folder(str(tmp_path)), LocalFolder)
    assert open_folder(f"file://{tmp_path}").uri == str(tmp_path)
    s3 = open_folder("s3://bucket/a/b/")
    assert isinstance(s3, S3Folder) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    parent, name = split_uri("s3://bucket/a/b.txt")
    assert (parent.uri, name) == ("s3://bucket/a", "b.txt")
    with pytest.raises(StepError, match="unsupported store URI scheme"):
        open_folder("gs://bucket/x")


def test_write_list_read_hash(folder):
    folder.write_bytes("b/two.txt", b"two")
    folder.write_bytes("a.txt", b"one")
    assert folder.list() == ["a.txt", "b/two.txt"]
    assert folder.list("b/") == ["b/two.txt"]
    assert folder.read_bytes("a.txt") == b"one"
    assert folder.size("b/two.txt") == 3
    assert folder.sha256("a.txt") == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    assert folder.join("b").list() == ["two.txt"]
    with folder.local_copy("b/two.txt") as path:
        assert path.read_bytes() == b"two"
    folder.delete("a.txt")
    assert not folder.exists("a.txt")


def test_failed_write_leaves_nothing_under_the_final_name(folder):
    with pytest.raises(RuntimeError), folder.local_write("out.bin") as pending:
        pending.path.write_bytes(b"half")
        raise RuntimeError("killed halfway")
    assert not folder.exists("out.bin")
    assert folder.list() == []


def test_a_reader_never_sees_a_partial_local_file(tmp_path):
    folder = open_folder(tmp_path)
    with folder.local_write("big.bin") as pending:
        pending.path.write_bytes(b"x" * 1000)
        assert not (tmp_path / "big.bin").exists()
        assert folder.list() == []  # the temporary is not listed either
    assert (tmp_path / "big.bin").stat().st_size == 1000


def test_manifest_skips_same_work_and_force_reruns(folder, caplog):
    calls = []

    def work(writer):
        calls.append(1)
        writer.write_bytes("out.txt", b"result", records=1)
        return {"n": len(calls)}

    first = run_step("demo", {"k": 1}, {}, folder, work)
    assert first.outputs["out.txt"]["records"] == 1
    with caplog.at_level("INFO"):
        again = run_step("demo", {"k": 1}, {}, folder, work)
    assert len(calls) == 1 and again.summary == {"n": 1}
    assert "skipped" in caplog.text
    run_step("demo", {"k": 2}, {}, folder, work)  # other parameters: runs again
    run_step("demo", {"k": 2}, {}, folder, work, force=True)
    assert len(calls) == 3
    assert read_manifest(folder).params == {"k": 2}


def test_a_failing_step_takes_back_what_it_wrote(folder):
    def work(writer):
        writer.write_bytes("first.txt", b"1")
        raise StepError("bad input halfway")

    with pytest.raises(StepError):
        run_step("demo", {}, {}, folder, work)
    assert folder.list() == []


def test_changed_input_content_reruns(tmp_path):
    src = open_folder(tmp_path / "in")
    src.write_bytes("input.txt", b"v1")
    out = open_folder(tmp_path / "out")
    runs = []

    def work(writer):
        runs.append(1)
        writer.write_bytes("o.txt", b"x")
        return {}

    uri = src.child_uri("input.txt")
    run_step("demo", {}, {"text": uri}, out, work)
    run_step("demo", {}, {"text": uri}, out, work)
    src.write_bytes("input.txt", b"v2")
    run_step("demo", {}, {"text": uri}, out, work)
    assert len(runs) == 2


@pytest.mark.s3
def test_unreachable_endpoint_wrong_credentials_and_missing_bucket(s3_env, corpus):
    args = ["build-corpus", "--input", str(corpus / "articles"), "--train-shards", "1"]
    # (message, exit code): an unreachable endpoint may come back (1: retried); the others are bad input (2)
    cases = {
        ("cannot reach the S3 endpoint", 1): ({"BERTDISTILL_S3_ENDPOINT_URL": "http://127.0.0.1:9"},
                                              "s3://bertdistill-test/x"),
        ("rejected the credentials", 2): ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://bertdistill-test/x"),
        ("does not exist", 2): ({}, "s3://no-such-bucket-here/x"),
    }
    for (message, code), (env, output) in cases.items():
        proc = run_cli(*args, "--output", output, env={**s3_env, **env})
        assert proc.returncode == code, proc.stderr
        lines = error_lines(proc)
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
