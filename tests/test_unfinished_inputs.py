"""A step reads another step's output only once that step committed it (manifest.committed_input).

A fault can leave a step's files without their manifest: an S3 endpoint killed while build-corpus
uploads a shard leaves the shards it finished, a killed step runs no clean-up. Each reader is
given a copy of a finished output with its manifest deleted, run by hand as a person would, and
must refuse it before any work: exit 2, one `error:` line naming the folder, the missing manifest
and the step to run again, and no output.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from bertdistill.errors import StepError
from bertdistill.manifest import FOLDER_MANIFEST, committed_input, manifest_name, run_step
from bertdistill.store import open_folder
from tests.conftest import distill_args, error_lines, run_cli


def _copy(source: Path, target: Path) -> Path:
    """A finished output, copied whole (manifest included)."""
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        shutil.copyfile(source.parent / manifest_name(source.name), target.parent / manifest_name(source.name))
    return target


def _unfinished_shard(source: Path, target: Path) -> Path:
    """A shard whose maker never wrote its `_MANIFEST.<shard>.json`."""
    _copy(source, target)
    (target.parent / manifest_name(target.name)).unlink()
    return target


def _unfinished_folder(source: Path, target: Path) -> Path:
    """A folder whose maker never wrote its `_MANIFEST.json`."""
    _copy(source, target)
    (target / FOLDER_MANIFEST).unlink()
    return target


# Each case: (fixtures, tmp_path) -> (command, output it must not write, folder named, manifest named, step named)
Case = Callable[[Callable[[str], Path], Path], tuple[list[str], Path, Path, str, str]]


def articles(fx, tmp):
    folder = _unfinished_folder(fx("corpus") / "articles", tmp / "articles")
    out = tmp / "text"
    return ["build-corpus", "--input", str(folder), "--output", str(out)], out, folder, FOLDER_MANIFEST, "extract"


def previous_articles(fx, tmp):
    folder = _unfinished_folder(fx("corpus") / "articles", tmp / "last-month")
    out = tmp / "text"
    return (["build-corpus", "--input", str(fx("corpus") / "articles"), "--previous", str(folder), "--output",
             str(out)], out, folder, FOLDER_MANIFEST, "extract")


def text_shard(fx, tmp):
    text = _unfinished_folder(fx("corpus") / "text", tmp / "text")
    out = tmp / "examples" / "shard-00000.tfrecord"
    return (["make-examples", "--input", str(text / "train" / "shard-00000.txt"), "--output", str(out),
             "--vocab-file", str(fx("sample") / "vocab.txt")], out.parent, text, FOLDER_MANIFEST, "build-corpus")


def example_shard(fx, tmp):
    shard = _unfinished_shard(fx("small_examples"), tmp / "examples" / "shard-00000.tfrecord")
    out = tmp / "labels" / "shard-00000.tfrecord"
    return (["label-teacher", "--teacher", str(fx("tiny_teacher")), "--input", str(shard), "--output", str(out)],
            out.parent, shard.parent, manifest_name(shard.name), "make-examples")


def examples_folder(fx, tmp):
    examples = tmp / "examples"
    _copy(fx("small_examples"), examples / "train" / "shard-00000.tfrecord")
    shard = _unfinished_shard(fx("small_examples"), examples / "heldout" / "shard-00000.tfrecord")
    out = tmp / "adapted"
    return (["adapt-teacher", "--teacher", str(fx("tiny_teacher")), "--examples", str(examples), "--output",
             str(out)], out, shard.parent, manifest_name(shard.name), "make-examples")


def train_labels(fx, tmp):
    labels = tmp / "labels"
    shard = _unfinished_shard(fx("labelled"), labels / "train" / "shard-00000.tfrecord")
    out = tmp / "student"
    return (distill_args(fx("tiny_teacher"), labels, out), out, shard.parent, manifest_name(shard.name),
            "label-teacher")


def _evaluate(fx, tmp, heldout: Path, *extra: str) -> list[str]:
    return ["evaluate", "--teacher", str(fx("tiny_teacher")), "--student", str(fx("tiny_student")), "--heldout",
            str(heldout), "--output", str(tmp / "report"), *extra]


def heldout_labels(fx, tmp):
    shard = _unfinished_shard(fx("labelled"), tmp / "heldout" / "shard-00000.tfrecord")
    return _evaluate(fx, tmp, shard.parent), tmp / "report", shard.parent, manifest_name(shard.name), "label-teacher"


def temporal_labels(fx, tmp):
    shard = _unfinished_shard(fx("labelled"), tmp / "temporal" / "shard-00000.tfrecord")
    return (_evaluate(fx, tmp, fx("labelled").parent, "--temporal", str(shard.parent)), tmp / "report",
            shard.parent, manifest_name(shard.name), "label-teacher")


def teacher(fx, tmp):
    folder = _unfinished_folder(fx("tiny_teacher"), tmp / "teacher")
    out = tmp / "labels" / "shard-00000.tfrecord"
    return (["label-teacher", "--teacher", str(folder), "--input", str(fx("small_examples")), "--output", str(out)],
            out.parent, folder, FOLDER_MANIFEST, "fetch-teacher or adapt-teacher")


def warm_start_student(fx, tmp):
    student = _unfinished_folder(fx("tiny_student"), tmp / "champion")
    out = tmp / "student"
    return (distill_args(fx("tiny_teacher"), fx("labels_dir"), out, "--init-from", str(student)), out, student,
            FOLDER_MANIFEST, "distill")


def evaluated_student(fx, tmp):
    student = _unfinished_folder(fx("tiny_student"), tmp / "student")
    args = _evaluate(fx, tmp, fx("labelled").parent)
    args[args.index("--student") + 1] = str(student)
    return args, tmp / "report", student, FOLDER_MANIFEST, "distill"


def report(fx, tmp):
    """evaluate writes report.json before its ONNX files and its manifest."""
    folder = tmp / "report"
    folder.mkdir()
    (folder / "report.json").write_text("{}\n")
    student = _copy(fx("tiny_student"), tmp / "student")  # its own copy: other tests publish the shared one
    shutil.rmtree(student / "published", ignore_errors=True)
    return (["publish", "--student", str(student), "--report", str(folder)], student / "published", folder,
            FOLDER_MANIFEST, "evaluate")


CASES: list[Case] = [articles, previous_articles, text_shard, example_shard, examples_folder, train_labels,
                     heldout_labels, temporal_labels, teacher, warm_start_student, evaluated_student, report]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_reader_refuses_an_input_whose_maker_did_not_commit_it(case: Case, request, tmp_path):
    args, output, folder, manifest, step = case(request.getfixturevalue, tmp_path)
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert line.startswith(f"error: {args[0]}: "), line
    assert str(folder) in line and f"has no {manifest}" in line and f"run {step} again" in line, line
    assert "Traceback" not in proc.stderr
    assert not output.exists() or not any(output.iterdir()), "refused before any work"


# -- the check itself, on outputs committed in-process ----------------------------------------------------
def _commit(folder: Path, step: str, files: dict[str, bytes], output_file: str | None = None) -> None:
    def work(writer):
        for name, data in files.items():
            writer.write_bytes(name, data)
        return {}

    run_step(step, {}, {}, open_folder(folder), work, output_file=output_file)


def test_a_finished_input_passes_and_gives_its_makers_manifest(tmp_path):
    _commit(tmp_path / "text", "build-corpus", {"train/shard-00000.txt": b"a\n\n"})
    _commit(tmp_path / "ex", "make-examples", {"s.tfrecord": b"x"}, output_file="s.tfrecord")
    assert committed_input(str(tmp_path / "text" / "train" / "shard-00000.txt"), "build-corpus", below=2).step == \
        "build-corpus"
    assert committed_input(str(tmp_path / "ex" / "s.tfrecord"), "make-examples", per_file=True).step == \
        "make-examples"
    assert committed_input(str(tmp_path / "text"), ("extract", "build-corpus")).step == "build-corpus"


def test_a_file_its_makers_manifest_does_not_list_is_refused(tmp_path):
    """build-corpus rerun with fewer shards leaves the old ones: present, committed folder, not listed."""
    _commit(tmp_path / "text", "build-corpus", {"train/shard-00000.txt": b"a\n\n"})
    (tmp_path / "text" / "train" / "shard-00007.txt").write_text("old\n\n")
    with pytest.raises(StepError, match=r"shard-00007\.txt is not among the files build-corpus committed"):
        committed_input(str(tmp_path / "text" / "train" / "shard-00007.txt"), "build-corpus", below=2)


def test_another_steps_output_and_a_missing_input_are_named_as_such(tmp_path):
    _commit(tmp_path / "labels", "label-teacher", {"s.tfrecord": b"x"}, output_file="s.tfrecord")
    with pytest.raises(StepError, match=r"was made by label-teacher .*, not by make-examples"):
        committed_input(str(tmp_path / "labels" / "s.tfrecord"), "make-examples", per_file=True)
    with pytest.raises(StepError, match=r"input .*nope\.tfrecord does not exist: check the URI, or run make-examples"):
        committed_input(str(tmp_path / "labels" / "nope.tfrecord"), "make-examples", per_file=True)
