"""build-corpus: articles -> sentence-per-line text shards, whole documents per shard.

The output is the format Google's create_pretraining_data reads: one sentence per line, a
blank line between documents. Unlike the old split_text script, a document is never cut:
each article goes whole to one shard, chosen by a hash of its id. Train and held-out
shards share one hash space (bucket = hash mod (N + M)), so an article stays on the same
side, in the same shard, however much the dump grows; the held-out set never leaks into
training next month.

Sentences come from sentencex (Wikimedia's rule-based segmenter, no models to download).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass

import sentencex

from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, is_manifest, run_step
from bertdistill.progress import Progress
from bertdistill.store import open_folder

log = logging.getLogger(__name__)


@dataclass
class BuildCorpusParams:
    input: list[str] = flag(help="articles folder URI(s) (extract's outputs, one per dump file): read these and "
                            "only these (the DAG passes one per dump file it selected, never a parent of others)")
    output: str = flag(help="text folder URI; writes train/ and heldout/ shards")
    train_shards: int = flag(8, minimum=1, help="number of train shards")
    heldout_shards: int = flag(1, minimum=0, help="number of held-out shards (0 allowed)")
    language: str = flag("en", help="language code for the sentence splitter")
    min_sentence_chars: int = flag(2, minimum=1, help="shorter sentences are dropped")
    force: bool = False


def shard_of(article_id: str, train_shards: int, heldout_shards: int) -> tuple[str, int]:
    bucket = int.from_bytes(hashlib.sha1(str(article_id).encode()).digest()[:8], "big") % (
        train_shards + heldout_shards)
    return ("train", bucket) if bucket < train_shards else ("heldout", bucket - train_shards)


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.txt"


def split_sentences(text: str, language: str, min_chars: int) -> list[str]:
    sentences = []
    for paragraph in text.split("\n"):
        if paragraph.strip():
            for sentence in sentencex.segment(language, paragraph):
                sentence = " ".join(sentence.split())
                if len(sentence) >= min_chars:
                    sentences.append(sentence)
    return sentences


def run(params: BuildCorpusParams) -> Manifest:
    if params.train_shards < 1 or params.heldout_shards < 0:
        raise StepError(f"--train-shards must be >= 1 and --heldout-shards >= 0 (got {params.train_shards}, "
                        f"{params.heldout_shards})")
    inputs = [params.input] if isinstance(params.input, str) else list(params.input)
    parts = []  # (folder, part name), in the order given
    for uri in inputs:
        folder = open_folder(uri)
        found = [n for n in folder.list() if n.endswith(".jsonl.gz") and not is_manifest(n)]
        if not found:
            raise StepError(f"{uri} holds no part-*.jsonl.gz articles: run extract on its dump file first")
        parts += [(folder, n) for n in found]
    output = open_folder(params.output)
    fingerprint = {"schema": 1, "train_shards": params.train_shards, "heldout_shards": params.heldout_shards,
                   "language": params.language, "min_sentence_chars": params.min_sentence_chars}

    def work(writer: OutputWriter) -> dict:
        names = [shard_name("train", i) for i in range(params.train_shards)]
        names += [shard_name("heldout", i) for i in range(params.heldout_shards)]
        stats = {n: {"documents": 0, "sentences": 0} for n in names}
        progress = Progress(log, "build-corpus")
        documents = 0
        with ExitStack() as stack:
            # streamed to the store as written: scratch holds one upload part per shard, not the corpus
            files = {n: io.TextIOWrapper(stack.enter_context(writer.stream(n)), encoding="utf-8", newline="\n")
                     for n in names}
            for articles, part in parts:
                with articles.open_read(part) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
                    for line in lines:
                        article = json.loads(line)
                        sentences = split_sentences(article["text"], params.language, params.min_sentence_chars)
                        if not sentences:
                            continue
                        name = shard_name(*shard_of(article["id"], params.train_shards, params.heldout_shards))
                        files[name].write("\n".join(sentences) + "\n\n")
                        stats[name]["documents"] += 1
                        stats[name]["sentences"] += len(sentences)
                        documents += 1
                        progress.update(documents, " documents")
            for f in files.values():
                f.close()
        for name, counts in stats.items():
            writer.note(name, **counts)
        sentences = sum(s["sentences"] for s in stats.values())
        heldout = sum(s["documents"] for n, s in stats.items() if n.startswith("heldout/"))
        print(f"build-corpus: {documents} documents, {sentences} sentences -> {params.train_shards} train + "
              f"{params.heldout_shards} held-out shards ({heldout} held-out documents) in "
              f"{progress.elapsed:.1f} s -> {output.uri}")
        return {"documents": documents, "sentences": sentences, "heldout_documents": heldout}

    roles = {"articles": inputs[0]} if len(inputs) == 1 else {f"articles[{i}]": u for i, u in enumerate(inputs)}
    return run_step("build-corpus", fingerprint, roles, output, work, force=params.force)
