"""build-corpus: articles -> sentence-per-line text shards, whole documents per shard.

The output is the format Google's create_pretraining_data reads: one sentence per line, a
blank line between documents. Unlike the old split_text script, a document is never cut:
each article goes whole to one shard, chosen by a hash of its id. Train and held-out
shards share one hash space (bucket = hash mod (N + M)), so an article stays on the same
side, in the same shard, however much the dump grows; the held-out set never leaks into
training next month.

Sentences come from sentencex (Wikimedia's rule-based segmenter, no models to download).

Given last month's articles (`--previous`), the articles new or changed since then (by id and a
hash of their text) that would go to training are split in two by a second hash of their id:
half stay in training, half go to the one temporal held-out shard. The student then learns some
of what changed and is scored on the rest, which no model has seen (TemporalWiki's measure of
what a refresh taught). The new and changed articles that stay in training are also copied to
fresh/shard-00000.txt: what a warm-started student trains on beside replay of the whole month
(TemporalWiki's diff), without reading every train shard to find them.
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
from bertdistill.manifest import Manifest, OutputWriter, committed_input, is_manifest, run_step
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
    previous: list[str] | None = flag(None, help="last month's articles folder URI(s): half of the articles "
                                      "new or changed since then that would go to training go to "
                                      "temporal/shard-00000.txt instead, and the other half are also copied to "
                                      "fresh/shard-00000.txt (default: neither)")
    force: bool = False


TEMPORAL = "temporal/shard-00000.txt"
FRESH = "fresh/shard-00000.txt"


def text_hash(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def goes_to_temporal(article_id: str) -> bool:
    """Half of the new or changed articles, by a hash independent of the one that picks their shard."""
    return hashlib.sha1(f"temporal:{article_id}".encode()).digest()[0] % 2 == 0


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


def article_parts(uris: list[str]):
    """(folder, part name) of every articles part in these folders, in the order given; a folder
    extract did not finish (no manifest) is refused, not read in part."""
    parts = []
    for uri in uris:
        folder = open_folder(uri)
        found = [n for n in folder.list() if n.endswith(".jsonl.gz") and not is_manifest(n)]
        if not found:
            raise StepError(f"{uri} holds no part-*.jsonl.gz articles: run extract on its dump file first")
        committed_input(uri, "extract")
        parts += [(folder, n) for n in found]
    return parts


def read_articles(parts):
    for articles, part in parts:
        with articles.open_read(part) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)


def run(params: BuildCorpusParams) -> Manifest:
    if params.train_shards < 1 or params.heldout_shards < 0:
        raise StepError(f"--train-shards must be >= 1 and --heldout-shards >= 0 (got {params.train_shards}, "
                        f"{params.heldout_shards})")
    inputs = [params.input] if isinstance(params.input, str) else list(params.input)
    parts = article_parts(inputs)
    previous = [params.previous] if isinstance(params.previous, str) else list(params.previous or [])
    previous_parts = article_parts(previous)
    output = open_folder(params.output)
    fingerprint = {"schema": 2, "train_shards": params.train_shards, "heldout_shards": params.heldout_shards,
                   "language": params.language, "min_sentence_chars": params.min_sentence_chars}

    def work(writer: OutputWriter) -> dict:
        names = [shard_name("train", i) for i in range(params.train_shards)]
        names += [shard_name("heldout", i) for i in range(params.heldout_shards)]
        names += [TEMPORAL, FRESH] if previous else []
        stats = {n: {"documents": 0, "sentences": 0} for n in names}
        progress = Progress(log, "build-corpus")
        documents = new_or_changed = 0
        last_month = {str(a["id"]): text_hash(a["text"]) for a in read_articles(previous_parts)}
        with ExitStack() as stack:
            # streamed to the store as written: scratch holds one upload part per shard, not the corpus
            files = {n: io.TextIOWrapper(stack.enter_context(writer.stream(n)), encoding="utf-8", newline="\n")
                     for n in names}
            for article in read_articles(parts):
                sentences = split_sentences(article["text"], params.language, params.min_sentence_chars)
                if not sentences:
                    continue
                split, index = shard_of(article["id"], params.train_shards, params.heldout_shards)
                name = shard_name(split, index)
                copies = [name]
                if previous and last_month.get(str(article["id"])) != text_hash(article["text"]):
                    new_or_changed += 1
                    if split == "train":
                        copies = [TEMPORAL] if goes_to_temporal(article["id"]) else [name, FRESH]
                for copy in copies:
                    files[copy].write("\n".join(sentences) + "\n\n")
                    stats[copy]["documents"] += 1
                    stats[copy]["sentences"] += len(sentences)
                documents += 1
                progress.update(documents, " documents")
            for f in files.values():
                f.close()
        for name, counts in stats.items():
            writer.note(name, **counts)
        sentences = sum(s["sentences"] for n, s in stats.items() if n != FRESH)  # fresh: copies
        heldout = sum(s["documents"] for n, s in stats.items() if n.startswith("heldout/"))
        summary = {"documents": documents, "sentences": sentences, "heldout_documents": heldout}
        temporal = ""
        if previous:
            summary |= {"new_or_changed_documents": new_or_changed, "temporal_documents": stats[TEMPORAL]["documents"],
                        "fresh_documents": stats[FRESH]["documents"]}
            temporal = (f"; {new_or_changed} new or changed since last month, {stats[TEMPORAL]['documents']} of "
                        f"them held out in the temporal shard, {stats[FRESH]['documents']} trained on and copied to "
                        "the fresh shard")
        print(f"build-corpus: {documents} documents, {sentences} sentences -> {params.train_shards} train + "
              f"{params.heldout_shards} held-out shards ({heldout} held-out documents{temporal}) in "
              f"{progress.elapsed:.1f} s -> {output.uri}")
        return summary

    roles = {"articles": inputs[0]} if len(inputs) == 1 else {f"articles[{i}]": u for i, u in enumerate(inputs)}
    roles |= {f"previous[{i}]": u for i, u in enumerate(previous)}
    return run_step("build-corpus", fingerprint, roles, output, work, force=params.force)
