"""One folder type over local paths, file:// and s3:// URIs.

Every step reads and writes through a `Folder`, so the same code runs against a laptop's
./data and a bucket. Two guarantees matter more than the API's breadth:

* No reader ever sees a partial file under its final name. Locally a write goes to a
  hidden temporary name in the same directory and is renamed into place; on S3 an object
  only becomes visible once its upload has completed (a put, or a multipart upload that
  `stream_write` feeds one part at a time).
* Content hashes are cheap to ask for: puts carry their sha256 in the object metadata,
  and a folder's `_MANIFEST.json` lists the sha256 of what it holds.

Writers that produce a file front to back use `stream_write`, readers `open_read` (on S3
a stream that resumes after a reset), so local scratch does not grow with a file's size.
`local_copy` and `local_write` hand out real paths for the few tools that need one
(WikiExtractor, safetensors, TensorFlow's SavedModel).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from bertdistill.errors import StepError

TEMP_MARK = ".tmp-"
HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scratch_dir() -> Path:
    """Where staged copies of remote objects live; a pod mounts an emptyDir here."""
    root = Path(os.environ.get("BERTDISTILL_SCRATCH") or Path(tempfile.gettempdir()) / "bertdistill")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {root}")
    except OSError as exc:
        raise StepError(f"the scratch folder {root} is not writable ({exc.strerror or exc}): mount a writable "
                        "volume there (in a pod, an emptyDir) or set BERTDISTILL_SCRATCH to a writable folder"
                        ) from None
    return root


@dataclass
class PendingFile:
    """A file being written: fill `path`; after the block, `sha256` and `size` describe it."""

    path: Path
    sha256: str = ""
    size: int = 0


class Folder(ABC):
    """A folder of named files (names may contain '/'), rooted at a URI."""

    uri: str

    # -- what each backend provides --------------------------------------------------
    @abstractmethod
    def join(self, *parts: str) -> Folder: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names below this folder (recursive), sorted, temporaries excluded."""

    @abstractmethod
    def open_read(self, name: str) -> BinaryIO: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def _stored_sha256(self, name: str) -> str | None:
        """A sha256 the backend already knows without reading the content."""

    @abstractmethod
    def _commit(self, temp: Path, name: str, sha256: str) -> None:
        """Make the finished local file `temp` visible under `name`, atomically."""

    @abstractmethod
    def _temp_path(self, name: str) -> Path: ...

    @abstractmethod
    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        """A local path holding the file's content, for code that needs a real file."""

    @abstractmethod
    def check(self) -> None:
        """Fail now, with a clear message, if this folder cannot be reached."""

    @abstractmethod
    def remove_stale_temps(self, only: str | None = None) -> None: ...

    # -- shared behaviour ------------------------------------------------------------
    def child_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def local_write(self, name: str) -> Iterator[PendingFile]:
        """Yield a temporary local file; on a clean exit its content appears under `name`.

        On an exception nothing appears and the temporary is removed. The sha256 is taken
        here so no caller has to read an output back.
        """
        pending = PendingFile(self._temp_path(name))
        pending.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield pending
            if not pending.path.exists():
                raise RuntimeError(f"local_write({name!r}): the block wrote nothing to {pending.path}")
            pending.sha256 = sha256_file(pending.path)
            pending.size = pending.path.stat().st_size
            self._commit(pending.path, name, pending.sha256)
        finally:
            pending.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def stream_write(self, name: str) -> Iterator[tuple[BinaryIO, PendingFile]]:
        """(a binary file to write `name`'s bytes to, its PendingFile): for writers that produce an
        output front to back. On a clean exit the file appears under `name`, whole; on an
        exception nothing does. Here (a local folder) it is local_write's temporary beside the
        destination; S3 overrides it to upload parts as they fill, so no output is ever held
        whole in scratch."""
        with self.local_write(name) as pending, open(pending.path, "wb") as f:
            yield f, pending

    def write_bytes(self, name: str, data: bytes) -> PendingFile:
        with self.local_write(name) as pending:
            pending.path.write_bytes(data)
        return pending

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as f:
            return f.read()

    def sha256(self, name: str) -> str:
        known = self._stored_sha256(name)
        if known:
            return known
        digest = hashlib.sha256()
        with self.open_read(name) as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


class LocalFolder(Folder):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        self.uri = str(self.path)

    def join(self, *parts: str) -> LocalFolder:
        return LocalFolder(self.path.joinpath(*parts))

    def _p(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self._p(name).is_file()

    def size(self, name: str) -> int:
        return self._p(name).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        if not self.path.is_dir():
            return []
        names = []
        for root, _, files in os.walk(self.path):
            for f in files:
                if TEMP_MARK in f:
                    continue
                rel = os.path.relpath(os.path.join(root, f), self.path).replace(os.sep, "/")
                if rel.startswith(prefix):
                    names.append(rel)
        return sorted(names)

    def open_read(self, name: str) -> BinaryIO:
        try:
            return open(self._p(name), "rb")
        except FileNotFoundError:
            raise StepError(f"{self.child_uri(name)} does not exist: check the path") from None

    def delete(self, name: str) -> None:
        self._p(name).unlink(missing_ok=True)

    def _stored_sha256(self, name: str) -> str | None:
        return None

    def _temp_path(self, name: str) -> Path:
        final = self._p(name)
        return final.with_name(f".{final.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}")

    def _commit(self, temp: Path, name: str, sha256: str) -> None:
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, self._p(name))

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        if not self.exists(name):
            raise StepError(f"{self.child_uri(name)} does not exist: check the path")
        yield self._p(name)

    def check(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StepError(f"{self.uri} is a file, but a folder is needed here")

    def remove_stale_temps(self, only: str | None = None) -> None:
        """Temporaries left by a killed process; nothing reads them, so they are just litter.

        With `only`, just that file's temporaries: other tasks may be writing other shards
        of the same folder right now.
        """
        if only is not None:
            final = self._p(only)
            for stale in final.parent.glob(f".{final.name}{TEMP_MARK}*"):
                stale.unlink(missing_ok=True)
        elif self.path.is_dir():
            for root, _, files in os.walk(self.path):
                for f in files:
                    if TEMP_MARK in f:
                        Path(root, f).unlink(missing_ok=True)


def open_folder(target: str | os.PathLike | Folder) -> Folder:
    """The one factory: a Folder, a local path, file:// or s3://bucket/prefix."""
    if isinstance(target, Folder):
        return target
    text = os.fspath(target)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StepError(f"{text!r} names no bucket: write s3://BUCKET/PREFIX")
        from bertdistill.s3store import S3Folder

        return S3Folder(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalFolder(parsed.path)
    if parsed.scheme == "":
        return LocalFolder(text)
    raise StepError(f"{text!r}: unsupported store URI scheme {parsed.scheme!r}; use a path, file:// or s3://")


def split_uri(uri: str) -> tuple[Folder, str]:
    """A file URI as (its parent folder, its name)."""
    text = os.fspath(uri).rstrip("/")
    head, _, name = text.rpartition("/")
    if not name:
        raise StepError(f"{uri!r} does not name a file")
    if not head:
        head = "."
    if text.startswith("s3://") and head.count("/") < 2:
        head += "/"
    return open_folder(head), name


def local_path(uri: str) -> str | None:
    """The file's path when the URI names a local file (a path or file://), else None."""
    folder, name = split_uri(uri)
    local = getattr(folder, "path", None)
    return None if local is None else str(local / name)


def interleaved_records(uris: list[str]) -> Iterator[bytes]:
    """TFRecord payloads of several files, one from each in turn (dropping a file when it ends),
    each streamed from its store with a bounded buffer, CRCs checked. The order tf.data's
    interleave(cycle_length=len(files), block_length=1) gives over local copies of them."""
    from bertdistill.tfrecord import read_records

    with contextlib.ExitStack() as stack:
        streams = []
        for uri in uris:
            folder, name = split_uri(uri)
            streams.append(read_records(stack.enter_context(folder.open_read(name)), uri))
        while streams:
            for stream in list(streams):
                try:
                    yield next(stream)
                except StopIteration:
                    streams.remove(stream)
