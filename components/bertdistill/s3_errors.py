"""What S3's errors mean to a step: which are worth a retry, and one short line for each.

Kept apart from the store's folder and its resuming reads so both say the same thing in
the same words (and test_errors.py checks those words without a server).
"""

from __future__ import annotations

import functools
import http.client

from bertdistill.errors import StepError, TransientError

# Answers an S3 server gives when it is busy or briefly broken: worth a later try (botocore has
# already retried them a few times within the call).
TRANSIENT_S3_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                      "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}


def explain_s3_error(exc: Exception, what: str, bucket: str) -> Exception:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, StepError):
        return exc
    if isinstance(exc, EndpointConnectionError):
        return TransientError(f"{what}: cannot reach the S3 endpoint ({exc.kwargs.get('endpoint_url')}); "
                              "check BERTDISTILL_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the network")
    if isinstance(exc, ConnectionClosedError | ReadTimeoutError):
        return TransientError(f"{what}: the connection to the S3 endpoint broke off ({exc}); a retry may pass")
    if isinstance(exc, NoCredentialsError):
        return StepError(f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY or an AWS profile")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404", "NotFound"):
            return StepError(f"{what}: bucket {bucket!r} does not exist; create it or fix the URI")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return StepError(f"{what}: the S3 server rejected the credentials ({code}); check "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions")
        if code in TRANSIENT_S3_CODES:
            return TransientError(f"{what}: the S3 server is busy or failing ({code}); a retry may pass")
        return StepError(f"{what}: S3 error {code}: {exc}")
    return exc


@functools.cache
def broken_stream_errors() -> tuple[type[BaseException], ...]:
    """What a body read raises when its connection breaks (botocore wraps some, not all)."""
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout

    return (ConnectionError, TimeoutError, http.client.IncompleteRead, ProtocolError, Urllib3ReadTimeout,
            ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)


def brief(exc: BaseException) -> str:
    """What went wrong underneath, in a few words ("Connection reset by peer"): the warnings and
    the final error stay one short line each, not botocore's wrapper around urllib3's around it."""
    root = root_cause(exc)
    text = root.strerror if isinstance(root, OSError) and root.strerror else str(root).strip()
    text = text.splitlines()[0] if text else type(root).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def root_cause(exc: BaseException) -> BaseException:
    """The builtin error (ConnectionResetError, ConnectionRefusedError, TimeoutError) under the
    wrappers, which keep it in kwargs["error"], in args or as __cause__ / __context__."""
    for _ in range(8):
        if type(exc).__module__ == "builtins":
            break
        inner = [getattr(exc, "kwargs", {}).get("error"), *exc.args, exc.__cause__, exc.__context__]
        found = next((e for e in inner if isinstance(e, BaseException)), None)
        if found is None:
            break
        exc = found
    return exc
