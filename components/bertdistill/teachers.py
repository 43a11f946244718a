"""A teacher folder in the store: staged locally for loading, identified by its weights' hash."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bertdistill.bert.config import CONFIG, VOCAB, WEIGHTS
from bertdistill.errors import StepError
from bertdistill.manifest import FOLDER_MANIFEST, read_manifest
from bertdistill.store import open_folder, scratch_dir


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


def teacher_identity(uri: str) -> dict[str, str]:
    """What labels record about their teacher: where it was and the sha256 of its weights."""
    folder = open_folder(uri)
    manifest = read_manifest(folder, FOLDER_MANIFEST)
    entry = manifest.outputs.get(WEIGHTS, {}) if manifest else {}
    return {"uri": uri, "weights_sha256": entry.get("sha256") or folder.sha256(WEIGHTS)}
