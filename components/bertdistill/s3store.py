"""The s3:// backend of store.py: boto3, with S3's errors turned into clear StepErrors.

An object becomes visible only when its upload completes, so uploads go straight to the
final key from a local scratch file, carrying their sha256 in the object metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from bertdistill.errors import StepError, TransientError
from bertdistill.s3_errors import explain_s3_error
from bertdistill.s3_reads import READ_PIECE, ResumingBody
from bertdistill.store import TEMP_MARK, Folder, PendingFile, scratch_dir

log = logging.getLogger(__name__)


class S3Folder(Folder):
    def __init__(self, bucket: str, prefix: str, client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def join(self, *parts: str) -> S3Folder:
        prefix = "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))
        return S3Folder(self.bucket, prefix, self._client)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # botocore's exceptions, translated for humans
            raise explain_s3_error(exc, what, self.bucket) from exc

    def _head(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise explain_s3_error(exc, f"reading {self.child_uri(name)}", self.bucket) from exc
        except Exception as exc:
            raise explain_s3_error(exc, f"reading {self.child_uri(name)}", self.bucket) from exc

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise StepError(f"{self.child_uri(name)} does not exist: check the URI")
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        names = []
        pages = paginator.paginate(Bucket=self.bucket, Prefix=base + prefix)
        for page in self._call(f"listing {self.uri}", list, pages):
            for obj in page.get("Contents", []):
                names.append(obj["Key"][len(base) :])
        return sorted(names)

    def open_read(self, name: str) -> BinaryIO:
        """A buffered stream of the object that resumes where it broke off (see ResumingBody)."""
        return io.BufferedReader(ResumingBody(self, name), buffer_size=READ_PIECE)

    def get_object(self, name: str, **kwargs) -> dict:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name), **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey"):
                raise StepError(f"{self.child_uri(name)} does not exist: check the URI") from None
            if code in ("412", "PreconditionFailed"):
                raise TransientError(f"{self.child_uri(name)} was replaced while it was being read; "
                                     "a retry reads the new one whole") from None
            raise explain_s3_error(exc, f"reading {self.child_uri(name)}", self.bucket) from exc
        except Exception as exc:
            raise explain_s3_error(exc, f"reading {self.child_uri(name)}", self.bucket) from exc

    def delete(self, name: str) -> None:
        self._call(f"deleting {self.child_uri(name)}", self.client.delete_object,
                   Bucket=self.bucket, Key=self._key(name))

    def _stored_sha256(self, name: str) -> str | None:
        head = self._head(name)
        return (head or {}).get("Metadata", {}).get("sha256")

    def _temp_path(self, name: str) -> Path:
        return scratch_dir() / "uploads" / f"{uuid.uuid4().hex}{TEMP_MARK}{Path(name).name}"

    def _commit(self, temp: Path, name: str, sha256: str) -> None:
        self._call(f"writing {self.child_uri(name)}", self.client.upload_file, str(temp), self.bucket,
                   self._key(name), ExtraArgs={"Metadata": {"sha256": sha256}})

    @contextlib.contextmanager
    def stream_write(self, name: str) -> Iterator[tuple[BinaryIO, PendingFile]]:
        """Bytes go up in parts as they are written (a multipart upload, visible only once complete);
        scratch holds one part at a time. An output smaller than a part is one put, as before."""
        upload = MultipartUpload(self, name)
        pending = PendingFile(upload.spill_path)
        buffered = io.BufferedWriter(upload, buffer_size=1 << 20)
        try:
            yield buffered, pending
            if not buffered.closed:
                buffered.flush()
            upload.complete()
        except BaseException:
            upload.abort()
            raise
        finally:
            upload.discard_spill()
        pending.sha256, pending.size = upload.sha256.hexdigest(), upload.size

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        staged = scratch_dir() / "downloads" / f"{uuid.uuid4().hex}-{Path(name).name}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        if not self.exists(name):
            raise StepError(f"{self.child_uri(name)} does not exist: check the URI")
        try:
            self._call(f"reading {self.child_uri(name)}", self.client.download_file, self.bucket,
                       self._key(name), str(staged))
            yield staged
        finally:
            staged.unlink(missing_ok=True)

    def check(self) -> None:
        self._call(f"opening {self.uri}", self.client.head_bucket, Bucket=self.bucket)

    def remove_stale_temps(self, only: str | None = None) -> None:
        """Abort multipart uploads an interrupted run left behind (they never became objects, but the
        server keeps their parts). Only `only`'s when one task writes one file of a shared folder,
        so the uploads of the tasks writing its other files are left alone."""
        prefix = self._key(only) if only else (f"{self.prefix}/" if self.prefix else "")
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in self._call(f"listing unfinished uploads under {self.uri}", list, pages):
            for upload in page.get("Uploads", []):
                if only and upload["Key"] != prefix:
                    continue
                log.info("aborting the unfinished upload of s3://%s/%s left by an earlier run", self.bucket,
                         upload["Key"])
                self._call(f"aborting the unfinished upload of s3://{self.bucket}/{upload['Key']}",
                           self.client.abort_multipart_upload, Bucket=self.bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"])


def part_bytes() -> int:
    """BERTDISTILL_UPLOAD_PART_MB (default 8, at least S3's minimum of 5): the scratch a streamed
    output holds at most, per file being written."""
    return max(5, int(os.environ.get("BERTDISTILL_UPLOAD_PART_MB") or 8)) << 20


class MultipartUpload(io.RawIOBase):
    """A writable file that uploads itself in parts: a part fills a spill file in scratch, goes up
    (botocore retries it), and the spill file is reused. Closing it commits nothing: stream_write's
    exit completes the upload on success and aborts it on failure (and, if the server cannot be
    reached then, the next run's remove_stale_temps does)."""

    def __init__(self, folder: S3Folder, name: str):
        super().__init__()
        self.folder, self.name, self.part_size = folder, name, part_bytes()
        self.spill_path = scratch_dir() / "uploads" / f"{uuid.uuid4().hex}{TEMP_MARK}{Path(name).name}"
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self.spill = open(self.spill_path, "w+b")  # noqa: SIM115 (closed by discard_spill)
        self.sha256, self.size = hashlib.sha256(), 0
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        self.spill.write(data)
        if self.spill.tell() >= self.part_size:
            self._upload_part()
        return len(data)

    def _spilled(self) -> bytes:
        self.spill.seek(0)
        data = self.spill.read()
        self.spill.seek(0)
        self.spill.truncate()
        return data

    def _upload_part(self) -> None:
        uri, key, client = self.folder.child_uri(self.name), self.folder._key(self.name), self.folder.client
        if self.upload_id is None:
            self.upload_id = self.folder._call(f"writing {uri}", client.create_multipart_upload,
                                               Bucket=self.folder.bucket, Key=key)["UploadId"]
        number = len(self.parts) + 1
        answer = self.folder._call(f"writing {uri} (part {number})", client.upload_part, Bucket=self.folder.bucket,
                                   Key=key, UploadId=self.upload_id, PartNumber=number, Body=self._spilled())
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def complete(self) -> None:
        uri, key, client = self.folder.child_uri(self.name), self.folder._key(self.name), self.folder.client
        if self.upload_id is None:  # small: one put, with the sha256 in its metadata like upload_file's
            self.folder._call(f"writing {uri}", client.put_object, Bucket=self.folder.bucket, Key=key,
                              Body=self._spilled(), Metadata={"sha256": self.sha256.hexdigest()})
            return
        if self.spill.tell():
            self._upload_part()
        self.folder._call(f"writing {uri}", client.complete_multipart_upload, Bucket=self.folder.bucket, Key=key,
                          UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})
        self.upload_id = None

    def abort(self) -> None:
        if self.upload_id is None:
            return
        try:
            self.folder.client.abort_multipart_upload(Bucket=self.folder.bucket, Key=self.folder._key(self.name),
                                                      UploadId=self.upload_id)
        except Exception as exc:  # the step's own failure is what matters; the next run aborts it
            log.warning("could not abort the unfinished upload of %s (%s); the next run will",
                        self.folder.child_uri(self.name), exc)

    def discard_spill(self) -> None:
        self.spill.close()
        self.spill_path.unlink(missing_ok=True)


def s3_client():
    """A boto3 S3 client configured from the standard AWS environment and config files.

    BERTDISTILL_S3_ENDPOINT_URL (or boto3's own AWS_ENDPOINT_URL[_S3]) points it at an
    S3-compatible server; those usually want path-style addressing. Timeouts are short so
    an unreachable endpoint fails in seconds instead of minutes.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("BERTDISTILL_S3_ENDPOINT_URL") or None
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=64,  # distill streams one object per label shard at once
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
