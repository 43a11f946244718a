"""label-teacher: run the teacher once over an example shard and cache what the student needs.

For each masked position: the top-k probabilities (temperature 1, sorted) with their ids
and the probability mass outside the top k; for each example the next-sentence logits.
The labelled record is the pretraining example with one more feature (see records.py for
the compact encoding): at most about 0.58 KB per example at k=10, P=20, where the seed's
fp32 + int64 cache took 1.3 KB and dropped the rest mass and the next-sentence outputs.

Labels are only valid for examples tokenized with the teacher's vocab: the example
shard's manifest records its vocab's sha256, and a mismatch is refused.

Given last month's labels (`--reuse`), an example found there byte for byte, labelled by this
teacher with this k, gets its label copied (label_cache.py): make-examples makes the same examples
for an unchanged article, so a month labels only what changed. A shard whose examples are all
found never imports TensorFlow or loads the teacher.

With `--replay` as well (a warm-started month's train shards), the first --max-examples examples
*found* in last month's labels are kept, their labels copied, and the others passed over: the
student replays unchanged articles, and meets the new and changed ones in the fresh shard, which is
labelled whole. The teacher runs only when the shard holds too few found examples (then the first of
the others fill up the count), so a warm month's train shards never start TensorFlow.

The teacher runs in float32 on every device, with TensorFloat-32 matmuls off: labels are
made once and read for every student, and bfloat16 labelling (emulated on the demo
teacher) moved top-10 probabilities by up to 11.7% and changed the top-10 list in half
the positions, far beyond the cache's own 3.2%.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from itertools import islice

from bertdistill.device import accelerator
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.label_cache import example_key, previous_labels
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.progress import Progress
from bertdistill.records import LABEL_FEATURE, TOP_K, encode_labels, join_label
from bertdistill.shards import check_label_vocab, examples_info
from bertdistill.store import split_uri
from bertdistill.teachers import staged_teacher, teacher_identity
from bertdistill.tfrecord import bytes_entry, bytes_list_body, frame, read_records

log = logging.getLogger(__name__)


@dataclass
class LabelTeacherParams:
    teacher: str = flag(help="teacher folder URI (with a masked-LM head)")
    input: str = flag(help="example shard URI (from make-examples)")
    output: str = flag(help="labelled shard URI to write (<labels>/<set>/<split>/<shard>.tfrecord)")
    top_k: int = flag(TOP_K, minimum=1, help="probabilities kept per masked position")
    batch_size: int = flag(64, minimum=1, help="examples per inference batch")
    max_examples: int = flag(0, help="label only the first N examples of the shard (0: all): the DAG passes what "
                             "distill will consume, so the teacher never labels examples nobody trains on")
    reuse: str | None = flag(None, help="last month's labels folder (<labels>, holding <set>/<split>/<shard>"
                             ".tfrecord): the labels of examples found there, made by this teacher with this k, "
                             "are copied instead of recomputed")
    replay: bool = flag(False, help="with --reuse and --max-examples: keep the first N examples found in last "
                        "month's labels and pass the others over (a warm start's replay of unchanged articles); "
                        "the teacher labels the first others only when fewer than N are found")
    force: bool = False


WINDOW = 16  # batches of records looked up at once: misses are labelled in full batches


def run(params: LabelTeacherParams) -> Manifest:
    if params.top_k < 1:
        raise StepError(f"--top-k must be at least 1, got {params.top_k}")
    info = examples_info(params.input)
    out_folder, out_name = split_uri(params.output)
    identity = teacher_identity(params.teacher)
    fingerprint = {"schema": 2, "top_k": params.top_k, "teacher_weights_sha256": identity["weights_sha256"]}
    if params.max_examples:
        fingerprint["max_examples"] = params.max_examples
    if params.replay:
        if not (params.reuse and params.max_examples):
            raise StepError("--replay keeps the first --max-examples examples found in --reuse's labels: give both")
        fingerprint["replay"] = True

    def work(writer: OutputWriter) -> dict:
        cache, used = {}, []
        if params.reuse:
            shard = "/".join(params.output.rstrip("/").rsplit("/", 2)[-2:])  # <split>/<shard>.tfrecord
            wanted = {"weights_sha256": identity["weights_sha256"], "top_k": params.top_k,
                      "vocab_sha256": info["vocab_sha256"], "max_seq_length": info["max_seq_length"],
                      "max_predictions_per_seq": info["max_predictions_per_seq"]}
            cache, used = previous_labels(params.reuse, shard, wanted)
        teacher = _Teacher(params, info)
        with writer.stream(out_name) as out:  # examples streamed in, labelled records streamed out
            summary = (_replay if params.replay and cache else _label)(params, out, teacher, cache)
        writer.note(out_name, records=summary["examples"])
        summary.update(teacher=identity, top_k=params.top_k, vocab_sha256=info["vocab_sha256"],
                       max_seq_length=info["max_seq_length"], max_predictions_per_seq=info["max_predictions_per_seq"],
                       reused_from=used)
        print(f"label-teacher: {summary['examples']:,} examples labelled (k={params.top_k}; {summary['reused']:,} "
              f"reused from last month's labels{_passed_over(summary)}) in {summary['seconds']:.1f} s, "
              f"{summary['examples_per_second']:,.0f} examples/s, "
              f"{summary['label_bytes_per_example']:.0f} label bytes/example -> {params.output}")
        return summary

    return run_step("label-teacher", fingerprint, {"examples": params.input, "teacher": params.teacher},
                    out_folder, work, output_file=out_name, force=params.force)


def _passed_over(summary: dict) -> str:
    skipped = summary.get("passed_over")
    return f"; {skipped:,} not found there passed over: replay" if skipped is not None else ""


def make_labeller(model, k: int, jit: bool):
    """The compiled labelling function: examples -> (top-k ids, top-k probs, rest mass, NSP logits)."""
    import tensorflow as tf

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def label(input_ids, input_mask, segment_ids, positions):
        sequence = model.encode(input_ids, input_mask, segment_ids)
        logits = model.mlm_logits(sequence, positions)
        top_logits, top_ids = tf.math.top_k(logits, k)
        # Probabilities from logits and one log-sum-exp: no [B, P, V] softmax is materialised twice.
        top_probs = tf.exp(top_logits - tf.reduce_logsumexp(logits, axis=-1, keepdims=True))
        rest = tf.maximum(1.0 - tf.reduce_sum(top_probs, axis=-1), 0.0)
        return top_ids, top_probs, rest, model.nsp_logits(sequence)

    return label


class _Teacher:
    """The teacher, loaded on the first example it must label: a shard found whole in last month's
    labels never imports TensorFlow."""

    def __init__(self, params: LabelTeacherParams, info: dict):
        self.params, self.info = params, info
        self.labeller = None
        self.load_seconds = 0.0  # TensorFlow's import and the teacher's load: not labelling throughput
        self.positions = 0
        self.topk_mass = 0.0

    def _load(self) -> None:
        started = time.perf_counter()
        import tensorflow as tf

        from bertdistill.bert.checkpoints import load_teacher
        from bertdistill.bert.model import Bert
        from bertdistill.tfdata import pretraining_spec

        params = self.params
        with staged_teacher(params.teacher) as local:
            config, weights, vocab = load_teacher(local, params.teacher)
        check_label_vocab(config.vocab_size, params.teacher)
        if vocab.sha256 != self.info["vocab_sha256"]:
            raise StepError(f"{params.input} was made with another vocab (sha256 {self.info['vocab_sha256'][:12]}…) "
                            f"than teacher {params.teacher} (sha256 {vocab.sha256[:12]}…): remake the examples "
                            "with the teacher's vocab.txt")
        if params.top_k > config.vocab_size:
            raise StepError(f"--top-k {params.top_k} is larger than the vocab ({config.vocab_size})")
        gpu, _ = accelerator()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        model = Bert(config, weights=weights)
        self.labeller = make_labeller(model, params.top_k, jit=gpu or os.environ.get("BERTDISTILL_XLA") == "1")
        self.spec = pretraining_spec(self.info["max_seq_length"], self.info["max_predictions_per_seq"])
        self.load_seconds = time.perf_counter() - started

    def label(self, examples: list[bytes]) -> list[bytes]:
        """Each example's label, as the map entry label-teacher appends to it."""
        import tensorflow as tf

        if self.labeller is None:
            self._load()
        batch = tf.io.parse_example(tf.constant(examples), self.spec)
        ids, probs, rest, nsp = self.labeller(*(tf.cast(batch[name], tf.int32) for name in (
            "input_ids", "input_mask", "segment_ids", "masked_lm_positions")))
        real = batch["masked_lm_weights"].numpy() > 0
        self.positions += int(real.sum())
        self.topk_mass += float((1.0 - rest.numpy())[real].sum())
        blobs = encode_labels(real.sum(axis=1), ids.numpy(), probs.numpy(), rest.numpy(), nsp.numpy())
        return [bytes_entry(LABEL_FEATURE, bytes_list_body([blob])) for blob in blobs]

    def label_batches(self, examples: list[bytes], batch_size: int) -> list[bytes]:
        return [entry for at in range(0, len(examples), batch_size)
                for entry in self.label(examples[at : at + batch_size])]


def _windows(records, size: int):
    window = []
    for record in records:
        window.append(record)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _label(params: LabelTeacherParams, out, teacher: _Teacher, cache: dict[bytes, bytes]) -> dict:
    """Every example of the shard (its first --max-examples), in order, with its label: copied from
    the cache when found there, else from the teacher in batches of --batch-size."""
    folder, name = split_uri(params.input)
    total = teacher.info.get("records")
    if params.max_examples and total is not None:
        total = min(total, params.max_examples)
    progress = Progress(log, "label-teacher", total)
    examples = label_bytes = reused = 0
    with folder.open_read(name) as f:
        records = read_records(f, params.input)
        if params.max_examples:
            records = islice(records, params.max_examples)
        for window in _windows(records, WINDOW * params.batch_size):
            entries = [cache.get(example_key(r)) for r in window] if cache else [None] * len(window)
            misses = [i for i, entry in enumerate(entries) if entry is None]
            reused += len(window) - len(misses)
            for i, entry in zip(misses, teacher.label_batches([window[i] for i in misses], params.batch_size),
                                strict=True):
                entries[i] = entry
            for record, entry in zip(window, entries, strict=True):
                out.write(frame(join_label(record, entry)))
                label_bytes += len(entry)
            examples += len(window)
            progress.update(examples, " examples")
    return _summary(examples, reused, label_bytes, progress, teacher)


def _summary(examples: int, reused: int, label_bytes: int, progress: Progress, teacher: _Teacher) -> dict:
    seconds = progress.elapsed - teacher.load_seconds
    return {"examples": examples, "reused": reused, "seconds": round(seconds, 3),
            "teacher_load_seconds": round(teacher.load_seconds, 3),
            "examples_per_second": examples / max(seconds, 1e-9),
            "label_bytes_per_example": label_bytes / max(examples, 1), "dtype": "float32",
            "mean_topk_mass": teacher.topk_mass / max(teacher.positions, 1)}


def _replay(params: LabelTeacherParams, out, teacher: _Teacher, cache: dict[bytes, bytes]) -> dict:
    """The first --max-examples examples of the shard found in the cache, in order, with their labels
    copied; then, only if the shard ran out first, the first of the others, labelled by the teacher."""
    folder, name = split_uri(params.input)
    progress = Progress(log, "label-teacher", params.max_examples)
    kept = label_bytes = misses = 0
    others: list[bytes] = []  # the first max_examples of them, in case the shard runs out
    with folder.open_read(name) as f:
        for record in read_records(f, params.input):
            entry = cache.get(example_key(record))
            if entry is None:
                misses += 1
                if len(others) < params.max_examples:
                    others.append(record)
                continue
            out.write(frame(join_label(record, entry)))
            label_bytes += len(entry)
            kept += 1
            progress.update(kept, " examples")
            if kept == params.max_examples:
                break
    filled = others[: params.max_examples - kept]
    for record, entry in zip(filled, teacher.label_batches(filled, params.batch_size), strict=True):
        out.write(frame(join_label(record, entry)))
        label_bytes += len(entry)
    if filled:
        log.info("label-teacher: only %d examples of %s found in last month's labels: the teacher labelled the "
                 "first %d others", kept, params.input, len(filled))
    return _summary(kept + len(filled), kept, label_bytes, progress, teacher) | {"passed_over": misses - len(filled)}
