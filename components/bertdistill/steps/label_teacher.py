"""label-teacher: run the teacher once over an example shard and cache what the student needs.

For each masked position: the top-k probabilities (temperature 1, sorted) with their ids
and the probability mass outside the top k; for each example the next-sentence logits.
The labelled record is the pretraining example with one more feature (see records.py for
the compact encoding): at most about 0.58 KB per example at k=10, P=20, where the seed's
fp32 + int64 cache took 1.3 KB and dropped the rest mass and the next-sentence outputs.

Labels are only valid for examples tokenized with the teacher's vocab: the example
shard's manifest records its vocab's sha256, and a mismatch is refused.

The teacher runs in float32 on every device, with TensorFloat-32 matmuls off: labels are
made once and read for every student, and bfloat16 labelling (emulated on the demo
teacher) moved top-10 probabilities by up to 11.7% and changed the top-10 list in half
the positions, far beyond the cache's own 3.2%.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from bertdistill.device import accelerator
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.progress import Progress
from bertdistill.records import LABEL_FEATURE, TOP_K, append_bytes_feature, encode_labels
from bertdistill.shards import check_label_vocab, examples_info
from bertdistill.store import split_uri
from bertdistill.teachers import staged_teacher, teacher_identity
from bertdistill.tfrecord import frame

log = logging.getLogger(__name__)


@dataclass
class LabelTeacherParams:
    teacher: str = flag(help="teacher folder URI (with a masked-LM head)")
    input: str = flag(help="example shard URI (from make-examples)")
    output: str = flag(help="labelled shard URI to write")
    top_k: int = flag(TOP_K, minimum=1, help="probabilities kept per masked position")
    batch_size: int = flag(64, minimum=1, help="examples per inference batch")
    max_examples: int = flag(0, help="label only the first N examples of the shard (0: all): the DAG passes what "
                             "distill will consume, so the teacher never labels examples nobody trains on")
    force: bool = False


def run(params: LabelTeacherParams) -> Manifest:
    if params.top_k < 1:
        raise StepError(f"--top-k must be at least 1, got {params.top_k}")
    info = examples_info(params.input)
    out_folder, out_name = split_uri(params.output)
    identity = teacher_identity(params.teacher)
    fingerprint = {"schema": 2, "top_k": params.top_k, "teacher_weights_sha256": identity["weights_sha256"]}
    if params.max_examples:
        fingerprint["max_examples"] = params.max_examples

    def work(writer: OutputWriter) -> dict:
        from bertdistill.bert.checkpoints import load_teacher

        with staged_teacher(params.teacher) as local:
            config, weights, vocab = load_teacher(local, params.teacher)
        check_label_vocab(config.vocab_size, params.teacher)
        if vocab.sha256 != info["vocab_sha256"]:
            raise StepError(f"{params.input} was made with another vocab (sha256 {info['vocab_sha256'][:12]}…) "
                            f"than teacher {params.teacher} (sha256 {vocab.sha256[:12]}…): remake the examples "
                            "with the teacher's vocab.txt")
        if params.top_k > config.vocab_size:
            raise StepError(f"--top-k {params.top_k} is larger than the vocab ({config.vocab_size})")
        with writer.stream(out_name) as out:  # examples streamed in, labelled records streamed out
            summary = _label(params.input, out, config, weights, info, params)
        writer.note(out_name, records=summary["examples"])
        summary.update(teacher=identity, top_k=params.top_k, vocab_sha256=vocab.sha256,
                       max_seq_length=info["max_seq_length"], max_predictions_per_seq=info["max_predictions_per_seq"])
        print(f"label-teacher: {summary['examples']:,} examples labelled (k={params.top_k}) in "
              f"{summary['seconds']:.1f} s, {summary['examples_per_second']:,.0f} examples/s, "
              f"{summary['label_bytes_per_example']:.0f} label bytes/example -> {params.output}")
        return summary

    return run_step("label-teacher", fingerprint, {"examples": params.input, "teacher": params.teacher},
                    out_folder, work, output_file=out_name, force=params.force)


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


def _label(uri: str, out, config, weights, info: dict, params: LabelTeacherParams) -> dict:
    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.tfdata import pretraining_spec
    from bertdistill.tfdata import records as record_stream

    L, P = info["max_seq_length"], info["max_predictions_per_seq"]
    gpu, _ = accelerator()
    dtype = "float32"
    tf.config.experimental.enable_tensor_float_32_execution(False)
    model = Bert(config)
    model.assign(weights)
    labeller = make_labeller(model, params.top_k, jit=gpu or os.environ.get("BERTDISTILL_XLA") == "1")
    spec = pretraining_spec(L, P)
    records = record_stream([uri])
    if params.max_examples:
        records = records.take(params.max_examples)
    dataset = (records.batch(params.batch_size)
               .map(lambda raw: (raw, tf.io.parse_example(raw, spec)), num_parallel_calls=2)
               .prefetch(2))
    total = info.get("records")
    if params.max_examples and total is not None:
        total = min(total, params.max_examples)
    progress = Progress(log, "label-teacher", total)
    examples = label_bytes = positions = 0
    topk_mass = 0.0
    try:
        for raw, batch in dataset:
            ids, probs, rest, nsp = labeller(tf.cast(batch["input_ids"], tf.int32),
                                             tf.cast(batch["input_mask"], tf.int32),
                                             tf.cast(batch["segment_ids"], tf.int32),
                                             tf.cast(batch["masked_lm_positions"], tf.int32))
            real = batch["masked_lm_weights"].numpy() > 0
            n_real = real.sum(axis=1)
            positions += int(real.sum())
            topk_mass += float((1.0 - rest.numpy())[real].sum())
            blobs = encode_labels(n_real, ids.numpy(), probs.numpy(), rest.numpy(), nsp.numpy())
            for record, blob in zip(raw.numpy(), blobs, strict=True):
                labelled = append_bytes_feature(record, LABEL_FEATURE, blob)
                label_bytes += len(labelled) - len(record)
                out.write(frame(labelled))
            examples += len(blobs)
            progress.update(examples, " examples")
    except tf.errors.DataLossError as exc:
        raise StepError(f"{params.input}: corrupt TFRecord ({str(exc).splitlines()[0]}); "
                        "regenerate it with make-examples") from None
    seconds = progress.elapsed
    return {"examples": examples, "seconds": round(seconds, 3),
            "examples_per_second": examples / max(seconds, 1e-9),
            "label_bytes_per_example": label_bytes / max(examples, 1), "dtype": dtype,
            "mean_topk_mass": topk_mass / max(positions, 1)}
