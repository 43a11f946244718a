"""Distillation quality: what each kind of soft target buys, against two references.

    python bench/quality.py [--run data/runs/enwiki-20160101] [--steps 200] [--batch-size 32]
                            [--rows control,cache-k10,...] [--teacher DIR --labels DIR]

Uses what `make demo` left in the store (the adapted teacher, its labelled train and
held-out shards), so every row trains the same student (the teacher's config with 3
layers, initialised from teacher layers 0/2/4) from the same init on the same batches in
the same order for the same steps, and differs only in its soft targets:

    control          hard labels only (masked-LM ids, next-sentence labels): the reference
                     every other row is judged against
    cache-k10        the DAG's setting: KL to the cached top-10 + rest mass, T=1
    cache-k5         the same cache cut to its top 5 (rest mass grows by what is cut)
    cache-k10-t2     the top-10 cache at temperature 2
    cache-k10-w4     the top-10 cache weighted 4 against the hard labels' 1 (DistilBERT weighs
                     its soft targets 5 against masked-LM 2)
    cache-k10-soft   the top-10 cache alone: no hard masked-LM loss
    online-dense     the teacher run online, KL to its full distribution: the upper bound
                     any cache of its outputs can reach
    online-hidden    online-dense plus DistilBERT's cosine loss between the last hidden
                     states of student and teacher
    online-relation  online-dense plus MiniLM v2's self-attention relation transfer: KL
                     between the teacher's and the student's last-layer query-query,
                     key-key and value-value relations (12 relation heads)
    sampled-12       what a sampled cache would hold ("Sparse Logit Sampling", arXiv
                     2503.16870): 12 tokens drawn from the teacher's distribution per
                     position, the target their counts / 12, an unbiased estimate of the
                     full distribution (no rest mass); drawn online, once per example
                     since no row's steps reach a second epoch

All rows use the DAG's other weights (hard masked-LM 1, next-sentence 0.5, soft
next-sentence 0.5 when there is a teacher). Each student is scored on the held-out shards:
masked-LM top-1 with the paired bootstrap 95% interval of its gain over the control,
agreement with the teacher's top-1, KL from the cached teacher and the expected
calibration error of its top-1. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROWS = ("control", "cache-k10", "cache-k5", "cache-k10-t2", "cache-k10-w4", "cache-k10-soft", "online-dense",
        "online-hidden", "online-relation", "sampled-12")
SAMPLES = 12
RELATION_HEADS = 12


def find_run(run: Path) -> tuple[Path, Path]:
    """(adapted teacher folder, labels folder) of a demo run."""
    teachers = sorted(p for p in (run / "teachers").glob("*-adapted-*") if (p / "_MANIFEST.json").exists())
    labels = sorted(p for p in (run / "labels").glob("*") if (p / "train").is_dir() and (p / "heldout").is_dir())
    if not teachers or not labels:
        raise SystemExit(f"{run} holds no adapted teacher and labels: run `make demo` first (or pass --run)")
    return teachers[-1], labels[-1]


def truncate_cache(batch: dict, k: int) -> dict:
    """The top-k cache cut to its first k entries; what is cut joins the rest mass (exact)."""
    import tensorflow as tf

    cut = tf.reduce_sum(batch["teacher_topk_probs"][..., k:], axis=-1)
    return {**batch, "teacher_topk_ids": batch["teacher_topk_ids"][..., :k],
            "teacher_topk_probs": batch["teacher_topk_probs"][..., :k],
            "teacher_rest_prob": batch["teacher_rest_prob"] + cut}


def relations(model, before_last, mask):
    """MiniLM v2's query-query, key-key and value-value relations of the model's last layer.

    `before_last` is the input of the last layer [B, L, H]; each relation is a softmax over
    scaled dot products within one of RELATION_HEADS heads, [B, heads, L, L], padding masked.
    """
    import tensorflow as tf

    B, L, H = tf.shape(before_last)[0], tf.shape(before_last)[1], model.config.hidden_size
    size = H // RELATION_HEADS
    x = tf.reshape(before_last, [-1, H])
    prefix = f"bert/encoder/layer_{model.config.num_hidden_layers - 1}/attention/self/"
    bias = (1.0 - tf.cast(mask, tf.float32))[:, None, None, :] * -10000.0
    out = []
    for name in ("query", "key", "value"):
        t = tf.matmul(x, model.weights[prefix + name + "/kernel"]) + model.weights[prefix + name + "/bias"]
        t = tf.transpose(tf.reshape(t, [B, L, RELATION_HEADS, size]), [0, 2, 1, 3])
        out.append(tf.nn.log_softmax(tf.matmul(t, t, transpose_b=True) / size ** 0.5 + bias))
    return out


def train(row: str, teacher_config, teacher_weights, paths: list[str], info: dict, args) -> tuple[dict, float]:
    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.losses import masked_lm_loss, next_sentence_loss, soft_mlm_loss, soft_next_sentence_loss
    from bertdistill.optim import AdamW
    from bertdistill.student import init_from_teacher, student_config
    from bertdistill.tfdata import labelled_dataset

    config = student_config(teacher_config, args.student_layers)
    model = Bert(config, seed=0)
    model.assign(init_from_teacher(teacher_weights, teacher_config, config))
    teacher = None
    if row.startswith(("online", "sampled")):
        teacher = Bert(teacher_config)
        teacher.assign(teacher_weights)
    variables = list(model.weights.values())
    optimizer = AdamW(model.weights, args.learning_rate, 30, args.steps)
    L, P = info["max_seq_length"], info["max_predictions_per_seq"]
    data = iter(labelled_dataset(paths, L, P, 10, args.batch_size, shuffle=True, repeat=True, seed=0))
    temperature = 2.0 if row.endswith("-t2") else 1.0
    soft_weight = 4.0 if row.endswith("-w4") else 1.0
    hard_weight = 0.0 if row.endswith("-soft") else 1.0

    @tf.function
    def step(b, seed):
        if row == "cache-k5":
            b = truncate_cache(b, 5)
        with tf.GradientTape() as tape:
            sequence = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"], training=True, seed=seed)
            logits = model.mlm_logits(sequence, b["masked_lm_positions"])
            nsp = model.nsp_logits(sequence)
            loss = (hard_weight * masked_lm_loss(logits, b["masked_lm_ids"], b["masked_lm_weights"])
                    + 0.5 * next_sentence_loss(nsp, b["next_sentence_labels"][:, 0]))
            if row.startswith("cache"):
                loss += soft_weight * soft_mlm_loss(logits, b["teacher_topk_ids"], b["teacher_topk_probs"],
                                                    b["teacher_rest_prob"], b["masked_lm_weights"], temperature)
                loss += 0.5 * soft_next_sentence_loss(nsp, b["teacher_nsp_logits"], temperature)
            if teacher is not None:
                t_sequence = teacher.encode(b["input_ids"], b["input_mask"], b["segment_ids"])
                t_logits = teacher.mlm_logits(t_sequence, b["masked_lm_positions"])
                loss += 0.5 * soft_next_sentence_loss(nsp, teacher.nsp_logits(t_sequence))
            if row == "sampled-12":
                flat = tf.reshape(t_logits, [-1, teacher_config.vocab_size])
                drawn = tf.random.stateless_categorical(flat, SAMPLES, seed, dtype=tf.int32)
                rows = tf.repeat(tf.range(tf.shape(flat)[0]), SAMPLES)
                index = tf.stack([rows, tf.reshape(drawn, [-1])], 1)
                share = tf.fill([tf.shape(index)[0]], 1 / SAMPLES)
                counts = tf.tensor_scatter_nd_add(tf.zeros_like(flat), index, share)
                target = tf.reshape(counts, tf.shape(t_logits))
                w = b["masked_lm_weights"]
                ce = -tf.reduce_sum(target * tf.nn.log_softmax(logits), -1)
                loss += tf.reduce_sum(ce * w) / tf.maximum(tf.reduce_sum(w), 1.0)
            elif teacher is not None:
                p = tf.nn.softmax(t_logits)
                kl = tf.reduce_sum(p * (tf.nn.log_softmax(t_logits) - tf.nn.log_softmax(logits)), -1)
                w = b["masked_lm_weights"]
                loss += tf.reduce_sum(kl * w) / tf.maximum(tf.reduce_sum(w), 1.0)
                if row == "online-relation":
                    n = teacher_config.num_hidden_layers
                    t_rel = relations(teacher, teacher.encode(b["input_ids"], b["input_mask"], b["segment_ids"],
                                                              num_layers=n - 1), b["input_mask"])
                    s_before = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"], training=True,
                                            seed=seed, num_layers=config.num_hidden_layers - 1)
                    s_rel = relations(model, s_before, b["input_mask"])
                    rows_mask = tf.cast(b["input_mask"], tf.float32)[:, None, :]
                    for t_log, s_log in zip(t_rel, s_rel, strict=True):
                        kl = tf.reduce_sum(tf.exp(t_log) * (t_log - s_log), -1)
                        loss += tf.reduce_sum(kl * rows_mask) / (tf.reduce_sum(rows_mask) * RELATION_HEADS)
                if row == "online-hidden":
                    mask = tf.cast(b["input_mask"], tf.float32)
                    cos = -tf.keras.losses.cosine_similarity(sequence, tf.stop_gradient(t_sequence), axis=-1)
                    loss += tf.reduce_sum((1.0 - cos) * mask) / tf.reduce_sum(mask)
        optimizer.apply(tape.gradient(loss, variables))
        return loss

    started = time.perf_counter()
    for i in range(1, args.steps + 1):
        loss = step(next(data), tf.constant([0, i], tf.int64))
        if i % 50 == 0:
            print(f"  {row}: step {i}/{args.steps} loss {float(loss):.3f}", flush=True)
    return {"config": config, "weights": model.numpy_weights()}, time.perf_counter() - started


def score(trained: dict, paths: list[str], info: dict) -> dict:
    """Per held-out position: correct?, agreement with the teacher, confidence; and the mean KL."""
    import numpy as np
    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.losses import soft_mlm_loss
    from bertdistill.tfdata import labelled_dataset

    model = Bert(trained["config"])
    model.assign(trained["weights"])

    @tf.function
    def predict(b):
        sequence = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"])
        logits = model.mlm_logits(sequence, b["masked_lm_positions"])
        kl = soft_mlm_loss(logits, b["teacher_topk_ids"], b["teacher_topk_probs"], b["teacher_rest_prob"],
                           b["masked_lm_weights"])
        return tf.argmax(logits, -1, output_type=tf.int32), tf.reduce_max(tf.nn.softmax(logits), -1), kl

    out: dict[str, list] = {"correct": [], "agree": [], "confidence": [], "teacher_correct": [],
                            "teacher_confidence": []}
    kl_sum = positions = 0.0
    for b in labelled_dataset(paths, info["max_seq_length"], info["max_predictions_per_seq"], 10, 64):
        top1, confidence, kl = predict(b)
        real = b["masked_lm_weights"].numpy() > 0
        y, t = b["masked_lm_ids"].numpy()[real], b["teacher_topk_ids"].numpy()[..., 0][real]
        out["correct"].append(top1.numpy()[real] == y)
        out["agree"].append(top1.numpy()[real] == t)
        out["confidence"].append(confidence.numpy()[real])
        out["teacher_correct"].append(t == y)
        out["teacher_confidence"].append(b["teacher_topk_probs"].numpy()[..., 0][real])
        kl_sum += float(kl) * real.sum()
        positions += real.sum()
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["kl"] = kl_sum / positions
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "data" / "runs" / "enwiki-20160101")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--teacher", type=Path, default=None, help="adapted teacher folder (default: the run's)")
    parser.add_argument("--labels", type=Path, default=None, help="labels folder with train/, heldout/ (the run's)")
    args = parser.parse_args()

    from bertdistill.bert.checkpoints import load_teacher
    from bertdistill.report_figures import calibration_error, paired_gain
    from bertdistill.shards import open_labels

    teacher_dir, labels = (args.teacher, args.labels) if args.teacher and args.labels else find_run(args.run)
    teacher_config, teacher_weights, vocab = load_teacher(teacher_dir, str(teacher_dir))
    train_paths = sorted(str(p) for p in (labels / "train").glob("*.tfrecord"))
    heldout_paths = sorted(str(p) for p in (labels / "heldout").glob("*.tfrecord"))
    info = open_labels(train_paths[0], vocab.sha256, 10)
    rows = [r for r in args.rows.split(",") if r]
    if rows[0] != "control" or any(r not in ROWS for r in rows):
        raise SystemExit(f"--rows must start with control and name rows among {', '.join(ROWS)}")
    print(f"teacher {teacher_dir.name} ({teacher_config.num_hidden_layers} layers, GELU "
          f"{teacher_config.hidden_act}); {len(train_paths)} train shards; {args.steps} steps x {args.batch_size}")
    results = {}
    for row in rows:
        trained, seconds = train(row, teacher_config, teacher_weights, train_paths, info, args)
        results[row] = score(trained, heldout_paths, info) | {"seconds": seconds}
        print(f"  {row}: held-out top-1 {results[row]['correct'].mean():.2%} in {seconds:.0f} s", flush=True)
    control = results["control"]
    teacher_acc = control["teacher_correct"].mean()
    print(f"\n{len(control['correct']):,} held-out masked positions; teacher top-1 {teacher_acc:.2%}, "
          f"calibration error {calibration_error(control['teacher_confidence'], control['teacher_correct']):.3f}\n")
    print("| row | held-out top-1 | gain over control (95% CI), points | of teacher | agreement with teacher "
          "| KL from teacher | calibration error | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row, r in results.items():
        gain, low, high = paired_gain(r["correct"], control["correct"])
        gain_text = "–" if row == "control" else f"{gain * 100:+.2f} ({low * 100:+.2f} to {high * 100:+.2f})"
        print(f"| {row} | {r['correct'].mean():.2%} | {gain_text} | {r['correct'].mean() / teacher_acc:.1%} | "
              f"{r['agree'].mean():.1%} | {r['kl']:.3f} | {calibration_error(r['confidence'], r['correct']):.3f} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
