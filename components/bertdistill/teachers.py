"""A teacher folder in the store: checked finished, staged locally for loading, identified by its weights' hash.

Steps read two kinds of model folder, both made by another step: a teacher (fetch-teacher's, or
adapt-teacher's when adapted) and a student's export/ (distill's, as a warm start, a scored student
or the champion). Each is refused unless its maker committed it (manifest.committed_input), in the
step's run() before any work, so an interrupted fetch or adaptation is never loaded.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bertdistill.bert.config import CONFIG, VOCAB, WEIGHTS
from bertdistill.errors import StepError
from bertdistill.manifest import Manifest, committed_input
from bertdistill.store import open_folder, scratch_dir

TEACHER_STEPS = ("fetch-teacher", "adapt-teacher")
EXPORT = "export"


def committed_teacher(uri: str) -> Manifest:
    """The teacher folder's manifest, refused unless fetch-teacher or adapt-teacher finished the folder.
    A teacher made elsewhere comes in through fetch-teacher --source, which checks it once."""
    return committed_input(uri, TEACHER_STEPS,
                           hint=" (a teacher folder made elsewhere: bring it in with fetch-teacher --source)")


def committed_export(student_uri: str) -> str:
    """The URI of a student's export/, refused unless distill finished the student: the export is
    written before the student folder's manifest, which lists it."""
    export = open_folder(student_uri).child_uri(EXPORT)
    committed_input(export, "distill", below=1)
    return export


@contextlib.contextmanager
def staged_teacher(uri: str) -> Iterator[Path]:
    """A local folder with the teacher's config, vocab and weights (the folder itself when local)."""
    folder = open_folder(uri)
    folder.check()
    missing = [n for n in (CONFIG, VOCAB, WEIGHTS) if not folder.exists(n)]
    if missing:
        raise StepError(f"teacher {uri} has no {', '.join(missing)}: run fetch-teacher to make it")
    local = getattr(folder, "path", None)
    if local is not None:
        yield local
        return
    tmp = Path(tempfile.mkdtemp(dir=scratch_dir(), prefix="teacher-"))
    try:
        for name in (CONFIG, VOCAB, WEIGHTS):
            with folder.local_copy(name) as path:
                shutil.copyfile(path, tmp / name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_weights_sha256(export_uri: str) -> str:
    """The sha256 of a committed student export's weights, as distill's manifest recorded it (hashed
    again only for a manifest without it)."""
    entry = committed_input(export_uri, "distill", below=1).outputs.get(f"{EXPORT}/{WEIGHTS}", {})
    return entry.get("sha256") or open_folder(export_uri).sha256(WEIGHTS)


def teacher_identity(uri: str) -> dict[str, str]:
    """What labels record about their teacher: where it was and the sha256 of its weights."""
    entry = committed_teacher(uri).outputs.get(WEIGHTS, {})
    return {"uri": uri, "weights_sha256": entry.get("sha256") or open_folder(uri).sha256(WEIGHTS)}
