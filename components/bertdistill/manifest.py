"""Manifests: the commit record of a step's output, and how a rerun knows it can skip.

A manifest is written after every output file has been committed, so its presence means
"done". It names the step, its parameters and the content hashes of its inputs; a later
run with the same three finds it, checks the listed outputs still exist with their sizes,
and skips. That is what makes an Airflow retry or the monthly refresh cheap and safe.

A step that fills a whole folder writes `<folder>/_MANIFEST.json`; a step that writes one
file of a shared folder (one shard of many, written by parallel tasks) writes
`<folder>/_MANIFEST.<file>.json` beside it, so shards commit independently.

The same presence is what a reader asks for: a step reads another step's output only once that
step has committed it (committed_input), so the files an interrupted run left are never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from bertdistill import __version__
from bertdistill.errors import StepError
from bertdistill.store import Folder, PendingFile, open_folder, split_uri

FOLDER_MANIFEST = "_MANIFEST.json"
log = logging.getLogger(__name__)


def manifest_name(output_file: str | None) -> str:
    return FOLDER_MANIFEST if output_file is None else f"_MANIFEST.{output_file}.json"


def is_manifest(name: str) -> bool:
    return name.rpartition("/")[2].startswith("_MANIFEST.")


@dataclass
class Manifest:
    step: str
    params: dict[str, Any]
    inputs: dict[str, str]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    code_version: str = __version__
    created: str = ""
    seconds: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls(**json.loads(data))

    def same_work(self, other: Manifest) -> bool:
        return (self.step, self.params, self.inputs) == (other.step, other.params, other.inputs)


def read_manifest(folder: Folder, name: str = FOLDER_MANIFEST) -> Manifest | None:
    if not folder.exists(name):
        return None
    try:
        return Manifest.from_bytes(folder.read_bytes(name))
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable manifest %s: %s", folder.child_uri(name), exc)
        return None


def committed_input(uri: str, steps: str | tuple[str, ...], *, per_file: bool = False, below: int = 0,
                    hint: str = "") -> Manifest:
    """The manifest of the step that made input `uri`, refused unless that step committed it.

    run_step commits a step's files one by one and its manifest last, so files without their
    manifest are an unfinished run's: a step killed mid-way, or one whose clean-up could not reach
    the store (an S3 endpoint gone while build-corpus uploads a shard leaves the shards it had
    finished). The DAG's task order alone kept readers off them; a step run by hand met them. So
    every step reads another step's output through here.

    Where the manifest lies (docs/architecture.md, "Store layout"): with `per_file`, the file is one
    of a shared folder and `_MANIFEST.<file>.json` lies beside it (make-examples, label-teacher);
    else `uri` lies `below` levels under the folder the step filled, whose `_MANIFEST.json` must
    list it (0: `uri` is that folder; build-corpus's `<text>/train/shard-N.txt`: 2; distill's
    `<student>/export`: 1). `hint` ends the message (what else may help).
    """
    steps = (steps,) if isinstance(steps, str) else steps
    makers = " or ".join(steps)
    folder, name = split_uri(uri) if per_file else _made_in(uri, below)
    mname = manifest_name(name) if per_file else FOLDER_MANIFEST
    manifest = read_manifest(folder, mname)
    if manifest is None:
        if not _exists(folder, name):
            raise StepError(f"input {uri} does not exist: check the URI, or run {makers} to make it")
        where = "it" if not (per_file or below) else folder.uri
        raise StepError(f"{uri} is not a finished {makers} output: {where} has no {mname} (written last, once "
                        f"every file is committed), so what is there may be partial; run {makers} again{hint}")
    if manifest.step not in steps:
        raise StepError(f"{uri} was made by {manifest.step} ({folder.child_uri(mname)}), not by {makers}: "
                        f"give an output of {makers}{hint}")
    if name and not any(n == name or n.startswith(f"{name}/") for n in manifest.outputs):
        raise StepError(f"{uri} is not among the files {manifest.step} committed ({folder.child_uri(mname)} does "
                        f"not list it): it is left from another run; give one it lists, or run {makers} again")
    return manifest


def _made_in(uri: str, below: int) -> tuple[Folder, str]:
    """(the folder a step filled, the name of `uri` in it) for a file or folder `below` levels under it."""
    head, names = uri.rstrip("/"), []
    for _ in range(below):
        head, _, name = head.rpartition("/")
        names.insert(0, name)
    return open_folder(head or "."), "/".join(names)


def _exists(folder: Folder, name: str) -> bool:
    """Whether `name` (a file or a folder; "" for `folder` itself) holds anything: a missing input is
    told apart from an unfinished one."""
    return (bool(name) and folder.exists(name)) or bool(folder.list(f"{name}/" if name else ""))


def input_fingerprint(uri: str) -> str:
    """A content hash for an input URI, as cheap as the store allows.

    A folder is identified by its manifest (which lists its files' hashes); a file by the
    hash its folder's manifest recorded, else by reading it; a folder no step made by the
    hashes of all its files.
    """
    folder = open_folder(uri)
    if folder.exists(FOLDER_MANIFEST):
        return "manifest:" + hashlib.sha256(folder.read_bytes(FOLDER_MANIFEST)).hexdigest()
    parent, name = split_uri(uri)
    parent.check()  # a missing bucket or bad credentials, said as such
    if not parent.exists(name):
        names = folder.list()
        if not names:
            raise StepError(f"input {uri} does not exist: check the URI, or run the step that makes it")
        listing = "\n".join(f"{n} {folder.sha256(n)}" for n in names)
        return "files:" + hashlib.sha256(listing.encode()).hexdigest()
    size = parent.size(name)
    for candidate in (FOLDER_MANIFEST, manifest_name(name)):
        manifest = read_manifest(parent, candidate)
        entry = (manifest.outputs.get(name) if manifest else None) or {}
        if entry.get("sha256") and entry.get("bytes") == size:
            return "sha256:" + entry["sha256"]
    return "sha256:" + parent.sha256(name)


class OutputWriter:
    """Hands out atomic writes into one output folder and remembers what was committed,
    so a failed step can take back everything it wrote."""

    def __init__(self, folder: Folder):
        self.folder = folder
        self.files: dict[str, dict[str, Any]] = {}

    def write(self, name: str):
        return _TrackedWrite(self, name)

    @contextlib.contextmanager
    def stream(self, name: str) -> Iterator[BinaryIO]:
        """A binary file whose bytes reach the output as they are written (Folder.stream_write)."""
        with self.folder.stream_write(name) as (f, pending):
            yield f
        self.files[name] = {"bytes": pending.size, "sha256": pending.sha256}

    def write_bytes(self, name: str, data: bytes, **meta: Any) -> None:
        pending = self.folder.write_bytes(name, data)
        self.files[name] = {"bytes": pending.size, "sha256": pending.sha256, **meta}

    def note(self, name: str, **meta: Any) -> None:
        """Attach facts (record counts) to a file already written."""
        self.files[name].update(meta)

    def adopt(self, name: str, **meta: Any) -> None:
        """Count a file committed by an earlier, interrupted run of the same work."""
        self.files[name] = {"bytes": self.folder.size(name), "sha256": self.folder.sha256(name), **meta}

    def keep(self, name: str) -> None:
        """Leave a committed file in place if the step fails: for files that are right on their own
        (checked against a checksum their source published), so a rerun need not make them again."""
        self.files.pop(name)

    def roll_back(self) -> None:
        for name in self.files:
            self.folder.delete(name)
        self.files.clear()


class _TrackedWrite:
    def __init__(self, writer: OutputWriter, name: str):
        self.writer, self.name = writer, name

    def __enter__(self) -> PendingFile:
        self._cm = self.writer.folder.local_write(self.name)
        self.pending = self._cm.__enter__()
        return self.pending

    def __exit__(self, *exc_info) -> bool:
        suppressed = self._cm.__exit__(*exc_info)
        if exc_info[0] is None:
            self.writer.files[self.name] = {"bytes": self.pending.size, "sha256": self.pending.sha256}
        return bool(suppressed)


def find_done(step: str, params: dict[str, Any], inputs: dict[str, str], output: Folder,
              output_file: str | None = None) -> tuple[Manifest, Manifest | None, bool]:
    """(the manifest this work would write, the one already committed or None, whether it matches)."""
    output.check()
    wanted = Manifest(step, params, {role: f"{uri} {input_fingerprint(uri)}" for role, uri in inputs.items()})
    done = read_manifest(output, manifest_name(output_file))
    return wanted, done, bool(done and done.same_work(wanted) and _outputs_intact(output, done))


def run_step(
    step: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    output: Folder,
    work: Callable[[OutputWriter], dict[str, Any]],
    *,
    output_file: str | None = None,
    force: bool = False,
) -> Manifest:
    """Skip if done, else run `work`, then commit the manifest last.

    `inputs` maps a role to a URI; the manifest stores their content fingerprints, so an
    input that changes under the same URI reruns the step. On any failure every file the
    run committed is deleted again: nothing half-written is left under the output.
    """
    wanted, done, matches = find_done(step, params, inputs, output, output_file)
    mname = manifest_name(output_file)
    if matches and not force:
        log.info("%s: skipped, %s already matches these inputs and parameters (use --force to rerun)",
                 step, output.child_uri(mname))
        return done
    if done:
        output.delete(mname)  # from here on the folder is "not done" until the new manifest lands
    output.remove_stale_temps(output_file)
    writer = OutputWriter(output)
    started = time.monotonic()
    try:
        wanted.summary = work(writer)
    except BaseException as failure:
        try:
            writer.roll_back()
        except Exception as cleanup:  # the step's own failure is what the error line must name
            log.warning("%s: removing the outputs of the failed run also failed: %s", step, cleanup)
        raise failure
    wanted.outputs = writer.files
    wanted.seconds = round(time.monotonic() - started, 3)
    wanted.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    output.write_bytes(mname, wanted.to_bytes())
    return wanted


def _outputs_intact(folder: Folder, manifest: Manifest) -> bool:
    for name, entry in manifest.outputs.items():
        if not folder.exists(name) or folder.size(name) != entry.get("bytes"):
            log.info("output %s is missing or changed; rerunning", folder.child_uri(name))
            return False
    return True
