"""fetch-teacher: a published BERT checkpoint -> the platform's teacher folder, verified once.

Sources: Google's zip (bert_config.json + bert_model.ckpt.* + vocab.txt; by default the
published uncased_L-12_H-768_A-12) by URL or path, a Hugging Face folder (config.json +
model.safetensors + vocab.txt), or a teacher folder in the platform's layout made elsewhere
(bert_config.json + model.safetensors under Google's names + vocab.txt): the steps that read a
teacher take only one whose manifest fetch-teacher (or adapt-teacher) committed. Archives are
unpacked defensively: absolute paths, `..` and links are refused before anything is written.
The result is checked variable by variable against its config, and its vocab against
vocab_size, so a teacher that reaches the store is never silently random or mismatched.
"""

from __future__ import annotations

import logging
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.store import open_folder, scratch_dir, sha256_file

GOOGLE_BERT_BASE_UNCASED = "https://storage.googleapis.com/bert_models/2018_10_18/uncased_L-12_H-768_A-12.zip"
log = logging.getLogger(__name__)


@dataclass
class FetchTeacherParams:
    output: str = flag(help="teacher folder URI, e.g. data/teachers/bert-base-uncased")
    source: str = flag(GOOGLE_BERT_BASE_UNCASED, help="Google BERT zip (URL or path), a Hugging Face folder "
                       "with config.json, model.safetensors and vocab.txt, or a teacher folder made elsewhere "
                       "(bert_config.json, model.safetensors, vocab.txt)")
    force: bool = False


def safe_unzip(archive: Path, dest: Path, source: str) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise StepError(f"{source}: not a zip archive") from None
    with zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or info.filename.startswith(("/", "\\")) or ".." in name.parts:
                raise StepError(f"{source}: refusing archive entry {info.filename!r}: it would write outside "
                                "the target folder")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise StepError(f"{source}: refusing archive entry {info.filename!r}: it is a link")
        zf.extractall(dest)


def _download(url: str, dest: Path) -> None:
    log.info("fetch-teacher: downloading %s", url)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StepError(f"cannot download {url}: {exc}") from None
    tmp.replace(dest)


def _find(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name), key=lambda p: len(p.parts))
    return found[0] if found else None


def _source_dir(source: str, work: Path) -> Path:
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        archive = work / "teacher.zip"
        _download(source, archive)
    else:
        path = Path(parsed.path if parsed.scheme == "file" else source)
        if not path.exists():
            raise StepError(f"--source {source} does not exist: give a Google BERT zip or a Hugging Face folder")
        if path.is_dir():
            return path
        archive = path
    safe_unzip(archive, work / "unpacked", source)
    return work / "unpacked"


def run(params: FetchTeacherParams) -> Manifest:
    from bertdistill.bert.checkpoints import (
        check_vocab,
        checked_weights,
        heads_present,
        read_google_checkpoint,
        read_safetensors_weights,
        save_teacher,
    )
    from bertdistill.bert.config import BertConfig
    from bertdistill.shards import check_label_vocab
    from bertdistill.tokenization import Vocab

    output = open_folder(params.output)

    def work(writer: OutputWriter) -> dict:
        with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            root = _source_dir(params.source, Path(tmp))
            google_index = _find(root, "bert_model.ckpt.index")
            config_path = _find(root, "bert_config.json") or _find(root, "config.json")
            vocab_path = _find(root, "vocab.txt")
            if config_path is None or vocab_path is None:
                raise StepError(f"{params.source}: no bert_config.json/config.json and vocab.txt found")
            config = BertConfig.from_json_file(config_path, f"{params.source}:{config_path.name}")
            vocab = Vocab(vocab_path, f"{params.source}:vocab.txt")
            check_vocab(vocab, config, params.source)
            check_label_vocab(config.vocab_size, params.source)
            if google_index is not None:
                arrays, kind = read_google_checkpoint(str(google_index)[: -len(".index")]), "google"
            elif (safetensors := _find(root, "model.safetensors")) is not None:
                arrays, kind = read_safetensors_weights(safetensors)
            else:
                raise StepError(f"{params.source}: no checkpoint found (bert_model.ckpt.index or model.safetensors)")
            weights = checked_weights(arrays, config, params.source, required_heads=())
            heads = heads_present(weights)
            staged = Path(tmp) / "teacher"
            save_teacher(staged, config, weights, vocab_path)
            for name in sorted(p.name for p in staged.iterdir()):
                with writer.write(name) as pending:
                    shutil.copyfile(staged / name, pending.path)
            digest = sha256_file(staged / "model.safetensors")
        params_count = int(sum(v.size for v in weights.values()))
        print(f"fetch-teacher: {kind} checkpoint, {config.num_hidden_layers} layers x {config.hidden_size}, "
              f"{params_count / 1e6:.1f} M parameters, heads: {', '.join(heads) or 'none'} -> {output.uri}")
        return {"format": kind, "heads": heads, "parameters": params_count, "weights_sha256": digest,
                "vocab_sha256": vocab.sha256, "config": config.__dict__}

    local_source = urlparse(params.source).scheme not in ("http", "https")
    inputs = {"source": params.source} if local_source else {}  # a local source is hashed: edits rerun
    return run_step("fetch-teacher", {"schema": 2, "source": params.source}, inputs, output, work,
                    force=params.force)
