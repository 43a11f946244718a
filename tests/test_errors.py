"""Exit codes say whether a retry can help: bad input 2, transient infrastructure faults 1."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError

from bertdistill.errors import StepError, TransientError
from bertdistill.s3_errors import explain_s3_error
from bertdistill.tracking import registry_error
from tests.conftest import error_lines, run_cli


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}}, "GetObject")


@pytest.mark.parametrize("code", ["SlowDown", "503", "InternalError", "ServiceUnavailable"])
def test_s3_busy_or_failing_is_transient(code):
    err = explain_s3_error(_client_error(code), "reading s3://b/k", "b")
    assert isinstance(err, TransientError) and err.exit_code == 1 and code in str(err)


def test_a_broken_connection_is_transient_and_refusals_are_bad_input():
    broken = explain_s3_error(ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), "reading s3://b/k", "b")
    assert isinstance(broken, TransientError)
    for code in ("AccessDenied", "NoSuchBucket", "InvalidArgument"):
        err = explain_s3_error(_client_error(code), "reading s3://b/k", "b")
        assert type(err) is StepError and err.exit_code == 2, code


def test_an_unreachable_tracking_server_is_transient_and_a_refusal_is_not():
    import requests

    try:
        try:
            raise requests.ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/create")
        except requests.ConnectionError as exc:
            raise RuntimeError("API request failed") from exc
    except RuntimeError as exc:
        assert isinstance(registry_error(exc, "registering m"), TransientError)
    refused = registry_error(RuntimeError("RESOURCE_ALREADY_EXISTS"), "registering m")
    assert type(refused) is StepError


def test_an_unwritable_scratch_folder_is_one_error_line_not_a_traceback(tmp_path):
    """A scratch path that cannot be made (here: under a file; in a container: a read-only root)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proc = run_cli("fetch-teacher", "--source", str(tmp_path), "--output", str(tmp_path / "teacher"),
                   env={"BERTDISTILL_SCRATCH": str(blocker / "scratch")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = error_lines(proc)
    assert "scratch folder" in line and "emptyDir" in line
    assert not (tmp_path / "teacher").exists()
