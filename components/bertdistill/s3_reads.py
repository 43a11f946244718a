"""Reading an S3 object through broken connections: ResumingBody picks up from the byte reached."""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import time

from bertdistill.errors import TransientError
from bertdistill.s3_errors import TRANSIENT_S3_CODES, brief, broken_stream_errors, explain_s3_error

log = logging.getLogger(__name__)

READ_PIECE = 64 << 10  # what one body read asks for, and so the most a reset loses
READ_STALLS = 6  # tries in a row without a new byte before a read gives up
RESUME_PAUSE_S = 0.5  # the first pause after a try without progress; it doubles, up to 8 s


class _Stall(Exception):
    """A try that brought no bytes but is worth another: `cause` is what the warning says happened."""

    def __init__(self, cause: str, detail: BaseException | None = None):
        super().__init__(cause)
        self.cause = cause
        self.detail = "" if detail is None else f" ({brief(detail)})"


def _how_it_broke(exc: BaseException) -> str:
    """The words for a body read that failed: a timeout or a short answer is not a reset."""
    from botocore.exceptions import IncompleteReadError
    from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout

    if isinstance(exc, TimeoutError | Urllib3ReadTimeout):
        return "timed out"
    if isinstance(exc, IncompleteReadError | http.client.IncompleteRead):
        return "the stream ended early"
    return "reset"


class ResumingBody(io.RawIOBase):
    """An object's bytes; when the connection resets or the server stops mid-stream, reading goes
    on from the byte reached (a Range request, If-Match the first answer's ETag, so a replaced
    object is never spliced onto the old one). botocore retries failed requests, but not a
    stream that breaks after its headers arrived: without this, a reset while build-corpus reads
    an article part kills the step, and a server that stops mid-read looks like a corrupt file.

    The body is read READ_PIECE bytes at a time, because a read that breaks loses what it had
    received: a reset costs at most one piece, so a link that resets every few hundred kB still
    gets through. For the same reason the budget counts only tries in a row that brought no new
    byte (`stalls`): a link that keeps resetting but delivers is read through however many resets
    it takes, and an endpoint that is gone fails after `stalls` tries.
    """

    def __init__(self, folder, name: str, stalls: int = READ_STALLS):
        super().__init__()
        self.folder, self.name, self.max_stalls = folder, name, stalls
        self.uri = folder.child_uri(name)
        first = folder.get_object(name)
        self.length, self.etag = int(first["ContentLength"]), first["ETag"]
        self.body = first["Body"]  # None after a break, until a new request answers
        self.offset = 0
        self.stalls, self.failed_at = 0, 0  # tries in a row without a new byte; the byte the last failure left at

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = min(len(buffer), READ_PIECE, self.length - self.offset)
        while want > 0:
            try:
                data = self._read_piece(want)
            except _Stall as stall:
                self._after_failure(stall)
                continue
            buffer[: len(data)] = data
            self.offset += len(data)
            return len(data)
        return 0

    def readall(self) -> bytes:
        """The rest, a piece per read (RawIOBase's own readall reads 8 KiB at a time)."""
        rest = bytearray()
        while piece := self.read(READ_PIECE):
            rest += piece
        return bytes(rest)

    def _read_piece(self, want: int) -> bytes:
        """Up to `want` bytes of the open answer, or of a new Range request if the last one broke.
        A broken answer is dropped at once, so the next try never reads its closed body."""
        if self.body is None:
            self.body = self._request_rest()
        try:
            data = self.body.read(want)
        except broken_stream_errors() as exc:
            self._drop_body()
            raise _Stall(f"{_how_it_broke(exc)} at byte {self.offset:,} of {self.length:,}", exc) from exc
        if not data:
            self._drop_body()
            raise _Stall(f"the stream ended early at byte {self.offset:,} of {self.length:,}")
        return data

    def _request_rest(self):
        """The body of a Range request for the bytes not yet read, If-Match the first ETag."""
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            answer = self.folder.client.get_object(Bucket=self.folder.bucket, Key=self.folder._key(self.name),
                                                   Range=f"bytes={self.offset}-", IfMatch=self.etag)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("412", "PreconditionFailed", "404", "NoSuchKey"):
                gone = "; it was deleted" if code in ("404", "NoSuchKey") else ""
                raise TransientError(f"reading {self.uri}: the object changed (ETag {self.etag} no longer "
                                     f"matches{gone}) after byte {self.offset:,} of {self.length:,} was read; "
                                     "a retry reads the new one whole") from None
            if code in TRANSIENT_S3_CODES:
                raise _Stall(f"the server answered {code} to the resume at byte {self.offset:,}", exc) from exc
            raise explain_s3_error(exc, f"reading {self.uri}", self.folder.bucket) from exc
        except (BotoConnectionError, HTTPClientError, *broken_stream_errors()) as exc:
            raise _Stall(f"cannot reach the endpoint {self.folder.client.meta.endpoint_url}", exc) from exc
        return answer["Body"]

    def _after_failure(self, stall: _Stall) -> None:
        """Count the try (a try that brought bytes starts the count afresh), give up after
        max_stalls in a row without progress, else warn with the cause and pause. No pause after a
        try that made progress: that link works, and each pause would slow a link that resets
        often but delivers; the pauses ride out an endpoint that is restarting."""
        self.stalls = 0 if self.offset > self.failed_at else self.stalls + 1
        self.failed_at = self.offset
        if self.stalls >= self.max_stalls:
            raise TransientError(f"reading {self.uri}: the connection broke off at byte {self.offset:,} of "
                                 f"{self.length:,} and {self.stalls} tries in a row to resume got no further "
                                 f"(last: {stall.cause}); a retry may pass (if it keeps failing, check the S3 "
                                 "endpoint and the network)")
        pause = min(RESUME_PAUSE_S * 2 ** (self.stalls - 1), 8) if self.stalls else 0
        then = (f"trying again in {pause:g} s ({self.stalls} of {self.max_stalls} tries without progress)"
                if self.stalls else "resuming from there")
        log.warning("reading %s: %s%s; %s", self.uri, stall.cause, stall.detail, then)
        time.sleep(pause)

    def _drop_body(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
            self.body = None

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()
