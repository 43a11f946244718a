"""make-examples: a text shard -> TFRecords of masked-LM + next-sentence examples.

Same examples, features and defaults as Google BERT's create_pretraining_data.py: segment
pairs built from whole sentences up to max_seq_length - 3 tokens (a shorter target with
probability short_seq_prob), a random next segment from another document half the time,
15% of tokens masked (80% [MASK], 10% a random vocab entry, 10% unchanged), optionally
whole words. Two things differ, both for memory and speed at Wikipedia scale:

* Streaming. Google's script keeps every document and every instance in memory (tens of
  GB on full Wikipedia). Here documents are read in chunks of BOUNDARY_EVERY documents
  on average; each chunk yields its examples for all dupe_factor
  passes, and the random next segment comes from another document of the same chunk.
  The shard is then shuffled as a whole, as Google's is, by shuffle.py's external sort on
  hash keys, in buckets of about BUCKET_BYTES. A chunk-local
  shuffle left the dupe_factor copies of a document within a few thousand consecutive
  records, so a student met the same sentence again every few dozen steps.
* Parallel and vectorised. Chunks go to a process per core; each tokenizes with the
  Rust WordPiece, builds instances as integer ranges into one token array, then masks and
  encodes whole batches with numpy.
* Per document. Every random draw is seeded from (random_seed, dupe pass, a hash of the
  document's text), and each instance's masking and place in the shard from that and its
  ordinal in the document; the random next document is picked by rendezvous hashing among the
  chunk's documents (uniform over the others, and unchanged unless the one picked, or a new one
  that outranks it, changed); a chunk ends after a document whose hash is 0 mod BOUNDARY_EVERY
  (or, rarely, at MAX_CHUNK_CHARS), so an edit moves no boundary but its own (a boundary after
  a minimum size would move with every edit before it). So the output is byte-identical for
  any number of workers, and next month an unchanged article yields the same examples, in the
  same order relative to each other, as this month: label-teacher reuses their labels. On the
  sample's 105 articles at dupe_factor 2, one article deleted, edited or added changes 0.4%,
  1.9% or 1.6% of the examples; Google's script draws everything from one generator, so one
  edit changes every example after it, and drawing the random document's start and the pair's
  trim from the document's own generator (whose number of draws then depends on the other
  document) still changed 14 to 23%.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import random
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import chain
from typing import BinaryIO

import numpy as np

from bertdistill import children
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, committed_input, run_step
from bertdistill.masking import mask_batch, mix64
from bertdistill.progress import Progress
from bertdistill.records import encode_pretraining
from bertdistill.shuffle import shuffled_output
from bertdistill.store import scratch_dir, split_uri
from bertdistill.tokenization import Vocab, wordpiece_tokenizer

BOUNDARY_EVERY = 32  # a chunk ends after a document whose content hash is 0 mod this
MAX_CHUNK_CHARS = 4 << 20  # memory's bound: a chunk ends here too (1,000 articles of 4 KB with no boundary: e^-32)
BATCH = 4096
BUCKET_BYTES = 16 << 20  # what the shuffle holds in memory at once: one bucket, read whole to permute
MAX_BUCKETS = 512  # files open at once; past 8 GB of examples in one shard, buckets grow instead
OUTPUT_BYTES_PER_INPUT_BYTE = 2  # per dupe pass, measured: about 1.4 at L=128 on Wikipedia text
log = logging.getLogger(__name__)


@dataclass
class MakeExamplesParams:
    input: str = flag(help="text shard URI that build-corpus committed (<text>/<split>/shard-N.txt: one sentence "
                      "per line, blank line between docs)")
    output: str = flag(help="TFRecord URI to write")
    vocab_file: str = flag(help="WordPiece vocab.txt URI")
    max_seq_length: int = flag(128, help="maximum sequence length (L)")
    max_predictions_per_seq: int = flag(20, help="maximum masked positions (P)")
    masked_lm_prob: float = flag(0.15, help="share of tokens to mask")
    dupe_factor: int = flag(10, help="passes over the input with different masks")
    short_seq_prob: float = flag(0.1, help="probability of a shorter target length")
    random_seed: int = flag(12345, help="seed; the output depends only on it and the input")
    do_whole_word_mask: bool = flag(False, help="mask whole words, not single pieces")
    do_lower_case: bool = flag(True, name="--no-lower-case", help="keep case (for cased vocabs)")
    workers: int = flag(0, help="worker processes (0: one per available core; the output is the same)")
    force: bool = False

    def validate(self) -> None:
        problems = []
        if self.max_seq_length < 5:
            problems.append(f"--max-seq-length {self.max_seq_length} leaves no room for [CLS] A [SEP] B [SEP]")
        if self.max_predictions_per_seq < 1:
            problems.append("--max-predictions-per-seq must be at least 1")
        if self.max_predictions_per_seq > self.max_seq_length:
            problems.append(f"--max-predictions-per-seq {self.max_predictions_per_seq} is larger than "
                            f"--max-seq-length {self.max_seq_length}: a sequence cannot have more masked "
                            "positions than tokens")
        if not 0 < self.masked_lm_prob <= 1:
            problems.append(f"--masked-lm-prob must be in (0, 1], got {self.masked_lm_prob}")
        if not 0 <= self.short_seq_prob <= 1:
            problems.append(f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}")
        if self.dupe_factor < 1:
            problems.append(f"--dupe-factor must be at least 1, got {self.dupe_factor}")
        if problems:
            raise StepError("; ".join(problems))


@dataclass
class _Context:
    """What every worker needs; built once per process."""

    L: int
    P: int
    masked_lm_prob: float
    short_seq_prob: float
    dupe_factor: int
    random_seed: int
    whole_word: bool
    vocab_tokens: list[str]
    lowercase: bool
    special: tuple[int, int, int]  # cls, sep, mask

    def setup(self) -> None:
        self.tokenizer = wordpiece_tokenizer(self.vocab_tokens, self.lowercase)
        self.continuation = np.array([t.startswith("##") for t in self.vocab_tokens])


def run(params: MakeExamplesParams) -> Manifest:
    params.validate()
    committed_input(params.input, "build-corpus", below=2)  # <text>/<split>/shard-N.txt
    text_folder, text_name = split_uri(params.input)
    vocab_folder, vocab_name = split_uri(params.vocab_file)
    out_folder, out_name = split_uri(params.output)
    fingerprint = {k: v for k, v in asdict(params).items() if k not in ("input", "output", "vocab_file",
                                                                          "workers", "force")}
    fingerprint["schema"] = 3

    def work(writer: OutputWriter) -> dict:
        with vocab_folder.local_copy(vocab_name) as vocab_path:
            vocab = Vocab(vocab_path, params.vocab_file)
        size = text_folder.size(text_name)
        # the text streamed in, the examples streamed out: scratch holds only the shuffle's buckets
        with text_folder.open_read(text_name) as text, writer.stream(out_name) as out:
            summary = _produce(text, size, params, vocab, out)
        writer.note(out_name, records=summary["examples"])
        summary["vocab_sha256"] = vocab.sha256
        print(f"make-examples: {summary['examples']:,} examples from {summary['documents']:,} documents "
              f"({summary['input_bytes'] / 1e6:.1f} MB, dupe_factor {params.dupe_factor}) in "
              f"{summary['seconds']:.2f} s, {summary['examples'] / max(summary['seconds'], 1e-9):,.0f} "
              f"examples/s -> {params.output}")
        return summary

    return run_step("make-examples", fingerprint, {"text": params.input, "vocab": params.vocab_file},
                    out_folder, work, output_file=out_name, force=params.force)


def _produce(text: BinaryIO, size: int, params: MakeExamplesParams, vocab: Vocab, out: BinaryIO) -> dict:
    ctx = _Context(params.max_seq_length, params.max_predictions_per_seq, params.masked_lm_prob,
                   params.short_seq_prob, params.dupe_factor, params.random_seed, params.do_whole_word_mask,
                   vocab.tokens, params.do_lower_case, (vocab.cls_id, vocab.sep_id, vocab.mask_id))
    workers = params.workers or len(os.sched_getaffinity(0))
    progress = Progress(log, "make-examples", size)
    totals = {"examples": 0, "documents": 0, "chunks": 0, "input_bytes": size}
    buckets = min(MAX_BUCKETS, max(1, -(-size * params.dupe_factor * OUTPUT_BYTES_PER_INPUT_BYTE // BUCKET_BYTES)))
    # The Rust tokenizer must not start its own thread pool before we fork workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with shuffled_output(out, buckets, scratch_dir()) as add:
        def scatter(result: tuple[bytes, np.ndarray, int], consumed: int) -> None:
            data, keys, documents = result
            add(data, keys)
            examples = len(keys)
            totals["examples"] += examples
            totals["documents"] += documents
            totals["chunks"] += 1
            progress.update(consumed, " B")

        chunks = _read_chunks(text, params.input)
        if workers == 1:
            _init_worker(ctx)
            for docs, keys, consumed in chunks:
                scatter(_build_chunk(docs, keys), consumed)
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            # Workers die with this step, SIGKILL included (children.py); forked from the main thread.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                     initializer=children.pool_initializer,
                                     initargs=(os.getpid(), _init_worker, ctx)) as pool:
                pending: deque = deque()
                for docs, keys, consumed in chunks:
                    pending.append((pool.submit(_build_chunk, docs, keys), consumed))
                    if len(pending) > 2 * workers:  # bounded: memory stays flat on any input
                        future, done_bytes = pending.popleft()
                        scatter(future.result(), done_bytes)
                while pending:
                    future, done_bytes = pending.popleft()
                    scatter(future.result(), done_bytes)
    totals["seconds"] = round(progress.elapsed, 3)
    totals["shuffle_buckets"] = buckets
    if totals["examples"] == 0:
        log.warning("make-examples: %s produced no examples (no documents with text)", params.input)
    return totals


def document_key(sentences: list[str]) -> int:
    """A document's 64-bit content hash: what its random draws are seeded from, month after month."""
    return int.from_bytes(hashlib.blake2b("\n".join(sentences).encode(), digest_size=8).digest(), "little")


def _read_chunks(text: BinaryIO, uri: str):
    """Yield (documents as lists of sentences, their content hashes, characters read so far)."""
    docs: list[list[str]] = []
    keys: list[int] = []
    doc: list[str] = []
    chars = read = 0
    try:
        with io.TextIOWrapper(text, encoding="utf-8") as f:
            for line in f:
                read += len(line)
                line = line.strip()
                if line:
                    doc.append(line)
                    chars += len(line)
                    continue
                if doc:
                    docs.append(doc)
                    keys.append(document_key(doc))
                    doc = []
                    if keys[-1] % BOUNDARY_EVERY == 0 or chars >= MAX_CHUNK_CHARS:
                        yield docs, keys, read
                        docs, keys, chars = [], [], 0
    except UnicodeDecodeError as exc:
        raise StepError(f"{uri}: not UTF-8 text ({exc}); make-examples reads build-corpus output") from None
    if doc:
        docs.append(doc)
        keys.append(document_key(doc))
    if docs:
        yield docs, keys, read


_CTX: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _CTX
    ctx.setup()
    _CTX = ctx


def _build_chunk(docs: list[list[str]], hashes: list[int]) -> tuple[bytes, np.ndarray, int]:
    """All examples of one chunk (its documents and their content hashes), framed, with their shuffle
    keys: (records, keys, document count)."""
    ctx = _CTX
    sentences = list(chain.from_iterable(docs))
    encodings = ctx.tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
    lengths = [len(e.ids) for e in encodings]
    flat = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=sum(lengths))
    doc_starts, doc_lens, doc_keys = [], [], []
    offset = k = 0
    for doc, key in zip(docs, hashes, strict=True):
        starts, lens = [], []
        for _ in doc:
            n = lengths[k]
            if n:  # a sentence of only control characters tokenizes to nothing
                starts.append(offset)
                lens.append(n)
            offset += n
            k += 1
        if lens:
            doc_starts.append(starts)
            doc_lens.append(lens)
            doc_keys.append(key)

    keys = np.array(doc_keys, dtype=np.uint64)
    instances: list[tuple[int, int, int, int, int]] = []
    owners: list[tuple[int, int, int]] = []  # (document key, dupe pass, ordinal in the document's pass)
    for dupe in range(ctx.dupe_factor):
        for d, key in enumerate(doc_keys):
            before = len(instances)
            rng = random.Random((ctx.random_seed << 96) | (dupe << 64) | key)
            _document_instances(d, doc_starts, doc_lens, ctx.L - 3, ctx.short_seq_prob, rng, keys, instances)
            owners.extend((key, dupe, i) for i in range(len(instances) - before))
    if not instances:
        return b"", np.zeros(0, np.uint64), len(doc_lens)
    table = np.array(instances, dtype=np.int64)
    owner = np.array(owners, dtype=np.uint64)
    seeds = mix64(mix64(owner[:, 0] ^ mix64(np.uint64(ctx.random_seed)))
                   + (owner[:, 1] << np.uint64(32)) + owner[:, 2])
    data = b"".join(encode_pretraining(mask_batch(table[i : i + BATCH], seeds[i : i + BATCH], flat, ctx))
                    for i in range(0, len(table), BATCH))
    return data, seeds, len(doc_lens)


def _random_other(d: int, point: int, keys: np.ndarray) -> int:
    """Rendezvous hashing: the document (not d) scoring highest for this draw. Uniform over the
    others, and the same next month unless that document, or a new one scoring higher, changed."""
    if len(keys) == 1:
        return d
    scores = mix64(keys ^ np.uint64(point))
    scores[d] = 0
    return int(scores.argmax())


def _document_instances(d: int, doc_starts: list[list[int]], doc_lens: list[list[int]], max_tokens: int,
                        short_seq_prob: float, rng: random.Random, keys: np.ndarray, out: list) -> None:
    """Google's create_instances_from_document, on token ranges instead of token lists:
    each instance is (A start, A length, B start, B length, is_random_next) into the flat
    token array, since A and B are always runs of consecutive sentences. The random document
    comes from `_random_other` over the chunk's document keys instead of a uniform index, and
    nothing about it (its length, how long the trim of the pair) changes how many draws the
    document's generator gives: a changed random document changes that instance alone."""
    starts, lens = doc_starts[d], doc_lens[d]
    n = len(lens)
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_tokens)
    first = length = i = 0
    while i < n:
        length += lens[i]
        if i == n - 1 or length >= target:
            m = i - first + 1
            a_end = 1 if m < 2 else rng.randint(1, m - 1)
            a_start = starts[first]
            la = starts[first + a_end - 1] + lens[first + a_end - 1] - a_start
            if m == 1 or rng.random() < 0.5:
                is_random = 1
                point = rng.getrandbits(64)
                other = _random_other(d, point, keys)
                ostarts, olens = doc_starts[other], doc_lens[other]
                j = (point >> 16) % len(olens)  # from the same draw: the other's length shifts no later draw
                b_start, lb, target_b = ostarts[j], 0, target - la
                while j < len(olens):
                    lb += olens[j]
                    j += 1
                    if lb >= target_b:
                        break
                i -= m - a_end  # the unused sentences start the next instance
            else:
                is_random = 0
                b_start = a_start + la
                lb = starts[i] + lens[i] - b_start
            trim = rng.getrandbits(64)  # one draw, however long the trim (or none)
            coins = random.Random(trim) if la + lb > max_tokens else None
            while la + lb > max_tokens:  # Google's truncate_seq_pair: trim the longer side
                if la > lb:
                    la -= 1
                    if coins.random() < 0.5:
                        a_start += 1
                else:
                    lb -= 1
                    if coins.random() < 0.5:
                        b_start += 1
            if la >= 1 and lb >= 1:
                out.append((a_start, la, b_start, lb, is_random))
            first, length = i + 1, 0
        i += 1
