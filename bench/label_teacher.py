"""Benchmark label-teacher: labelled examples/s, achieved FLOP/s against this machine's
measured dense-matmul FLOP/s (same dtype, same process), and label bytes per example.

    python bench/label_teacher.py [--teacher DIR] [--examples N] [--batch-size B]

The teacher defaults to the MiniLM of the sample with its heads freshly initialised (the
cost of labelling does not depend on how well the heads were fitted). FLOPs are counted
analytically for what labelling computes: the encoder's matmuls and attention, the
masked-LM transform and its 30,522-word projection at the P masked positions, the pooler
and the next-sentence classifier (2 FLOPs per multiply-add). The matmul reference is the
best of a few square float32 (or bfloat16 on a GPU) products of the size below, timed in
the same process after the labelling run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def labelling_flops(config, L: int, P: int) -> float:
    H, inner, V, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_layer = 2 * L * (4 * H * H + 2 * H * inner) + 2 * 2 * L * L * H  # projections + QK^T and PV
    heads = 2 * P * (H * H + H * V) + 2 * (H * H + 2 * H)
    return layers * per_layer + heads


def matmul_flops_per_second(dtype, n: int = 2048, repeats: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.normal([n, n], dtype=tf.float32)
    b = tf.random.normal([n, n], dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import tensorflow as tf

    from bertdistill.bert.checkpoints import load_teacher, read_hf_weights, save_teacher
    from bertdistill.bert.config import BertConfig
    from bertdistill.bert.model import Bert
    from bertdistill.device import accelerator
    from bertdistill.sample import make_sample
    from bertdistill.steps.fetch_teacher import FetchTeacherParams
    from bertdistill.steps.fetch_teacher import run as fetch_teacher
    from bertdistill.steps.label_teacher import LabelTeacherParams, run
    from bertdistill.steps.make_examples import MakeExamplesParams
    from bertdistill.steps.make_examples import run as make_examples

    sample = ROOT / "data" / "sample"
    make_sample(sample, ROOT / ".cache" / "wheels")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = args.teacher
        if teacher is None:
            teacher = work / "teacher"
            config = BertConfig.from_json_file(sample / "minilm" / "config.json")
            model = Bert(config)
            model.assign({k: v for k, v in read_hf_weights(sample / "minilm" / "model.safetensors").items()
                          if k in model.weights})
            save_teacher(work / "made-elsewhere", config, model.numpy_weights(), sample / "vocab.txt")
            # label-teacher reads only a teacher fetch-teacher committed
            fetch_teacher(FetchTeacherParams(output=str(teacher), source=str(work / "made-elsewhere")))
        config = load_teacher(teacher, str(teacher))[0]
        text = _sample_text(work)
        examples = work / "examples" / "shard.tfrecord"
        make_examples(MakeExamplesParams(input=str(text), output=str(examples), vocab_file=str(sample / "vocab.txt"),
                                         dupe_factor=1))
        _truncate_records(examples, args.examples)
        labels = work / "labels" / "shard.tfrecord"
        summary = run(LabelTeacherParams(teacher=str(teacher), input=str(examples), output=str(labels),
                                         batch_size=args.batch_size)).summary
        gpu, dtype = accelerator()
        steady = steady_examples_per_second(teacher, examples, args.batch_size, dtype)
        peak = matmul_flops_per_second(tf.dtypes.as_dtype(dtype))
        achieved = steady * labelling_flops(config, 128, 20)
        print(f"device: {'GPU' if gpu else 'CPU'} ({os.cpu_count()} cores), dtype {dtype}, teacher "
              f"{config.num_hidden_layers} x {config.hidden_size}, batch {args.batch_size}")
        print(f"labelled examples/s       {summary['examples_per_second']:,.1f} (whole step, {summary['examples']:,} "
              "examples, start-up and tracing included)")
        print(f"steady examples/s         {steady:,.1f} (labelling function after one warm-up batch)")
        print(f"FLOPs per example         {labelling_flops(config, 128, 20) / 1e9:.2f} GFLOP")
        print(f"achieved FLOP/s           {achieved / 1e9:,.1f} GFLOP/s")
        print(f"dense matmul FLOP/s       {peak / 1e9:,.1f} GFLOP/s (2048^3, {dtype})")
        print(f"achieved / matmul         {achieved / peak:.1%}")
        print(f"label bytes per example   {summary['label_bytes_per_example']:.0f} (k=10, P=20)")
        print(f"mean top-k mass           {summary['mean_topk_mass']:.3f}")


def steady_examples_per_second(teacher: Path, examples: Path, batch_size: int, dtype: str) -> float:
    """Throughput of the labelling function itself, batches already in memory, tracing excluded."""
    import tensorflow as tf

    from bertdistill.bert.checkpoints import load_teacher
    from bertdistill.bert.model import Bert
    from bertdistill.steps.label_teacher import make_labeller
    from bertdistill.tfdata import pretraining_dataset

    config, weights, _ = load_teacher(teacher, str(teacher))
    model = Bert(config, compute_dtype=tf.dtypes.as_dtype(dtype))
    model.assign(weights)
    labeller = make_labeller(model, 10, jit=dtype != "float32")
    batches = list(pretraining_dataset([str(examples)], 128, 20, batch_size, repeat=True).take(12))
    def call(b):
        return labeller(b["input_ids"], b["input_mask"], b["segment_ids"], b["masked_lm_positions"])
    [t.numpy() for t in call(batches[0])]
    started = time.perf_counter()
    for batch in batches[1:]:
        [t.numpy() for t in call(batch)]
    return batch_size * (len(batches) - 1) / (time.perf_counter() - started)


def _sample_text(work: Path) -> Path:
    """The sample as one text shard, made by extract and build-corpus (make-examples reads only theirs)."""
    from tests.conftest import SAMPLE_DUMP_NAME

    from bertdistill.steps.build_corpus import BuildCorpusParams
    from bertdistill.steps.build_corpus import run as build_corpus
    from bertdistill.steps.extract import ExtractParams
    from bertdistill.steps.extract import run as extract

    sample = ROOT / "data" / "sample"
    extract(ExtractParams(input=str(sample / SAMPLE_DUMP_NAME), output=str(work / "articles")))
    build_corpus(BuildCorpusParams(input=[str(work / "articles")], output=str(work / "corpus"), train_shards=1,
                                   heldout_shards=0))
    return work / "corpus" / "train" / "shard-00000.txt"


def _truncate_records(path: Path, limit: int) -> None:
    """Keep the first `limit` records (the manifest's count is only used for progress)."""
    from bertdistill.tfrecord import frame, read_records

    with open(path, "rb") as f:
        records = [r for _, r in zip(range(limit), read_records(f), strict=False)]
    path.write_bytes(b"".join(frame(r) for r in records))


if __name__ == "__main__":
    main()
