"""evaluate: the student against its teacher on the held-out labelled shards.

Accuracy alone misleads on masked-LM: always answering the most frequent token ("the")
scores about 5% here, and a weak teacher agrees with such a student 44% of the time. So
the report puts every figure beside that baseline and adds accuracy on the tokens outside
the 10 most frequent. The teacher's predictions come from the cached labels (its top-1 is
the first cached id), so only the student runs over the data; both models are timed on
one batch for latency, encoder alone and with the masked-LM head.

Output: report.json and report.png in the output folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertdistill.errors import StepError
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.store import open_folder, scratch_dir, stage_locally
from bertdistill.teachers import staged_teacher

log = logging.getLogger(__name__)


@dataclass
class EvaluateParams:
    teacher: str
    student: str
    heldout: str
    output: str
    top_k: int = 10
    batch_size: int = 64
    max_examples: int = 0  # 0: all
    latency_batch: int = 32
    force: bool = False


def run(params: EvaluateParams) -> Manifest:
    output = open_folder(params.output)
    fingerprint = {k: v for k, v in params.__dict__.items() if k not in ("teacher", "student", "heldout", "output",
                                                                        "force")}
    fingerprint["schema"] = 1

    def work(writer: OutputWriter) -> dict:
        from bertdistill.bert.checkpoints import load_teacher
        from bertdistill.steps.label_teacher import open_labels

        with staged_teacher(params.teacher) as local:
            teacher_config, teacher_weights, vocab = load_teacher(local, params.teacher)
        student_folder = open_folder(params.student).join("export")
        with staged_teacher(student_folder.uri) as local:
            student_config, student_weights, student_vocab = load_teacher(local, student_folder.uri)
        if student_vocab.sha256 != vocab.sha256:
            raise StepError(f"student {params.student} uses another vocab than teacher {params.teacher}")
        folder = open_folder(params.heldout)
        names = [n for n in folder.list() if n.endswith(".tfrecord")]
        if not names:
            raise StepError(f"{params.heldout} holds no labelled .tfrecord shards: label the held-out split first")
        info = open_labels(folder.child_uri(names[0]), vocab.sha256, params.top_k)
        for name in names[1:]:
            open_labels(folder.child_uri(name), vocab.sha256, params.top_k)
        with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            paths = stage_locally([folder.child_uri(n) for n in names], Path(tmp))
            report = evaluate(student_config, student_weights, teacher_config, teacher_weights, paths, info, params)
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            chart(report, Path(tmp) / "report.png")
            for name in ("report.json", "report.png"):
                writer.write_bytes(name, (Path(tmp) / name).read_bytes())
        s, t = report["student"], report["teacher"]
        print(f"evaluate: {report['positions']:,} held-out masked positions; masked-LM top-1 student "
              f"{s['mlm_accuracy']:.1%} vs teacher {t['mlm_accuracy']:.1%} ({report['student_over_teacher']:.1%} "
              f"kept; most-frequent-token baseline {report['baseline']['mlm_accuracy']:.1%}); encoder "
              f"{report['speedup_encoder']:.2f}x faster -> {output.uri}")
        return report

    return run_step("evaluate", fingerprint, {"teacher": params.teacher, "student": params.student,
                                              "heldout": params.heldout}, output, work, force=params.force)


def evaluate(student_config, student_weights, teacher_config, teacher_weights, paths: list[str], info: dict,
             params: EvaluateParams) -> dict:
    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.losses import soft_mlm_loss
    from bertdistill.tfdata import labelled_dataset

    student = Bert(student_config)
    student.assign(student_weights)
    teacher = Bert(teacher_config)
    teacher.assign(teacher_weights)
    L, P, k = info["max_seq_length"], info["max_predictions_per_seq"], params.top_k

    @tf.function
    def predict(b):
        sequence = student.encode(b["input_ids"], b["input_mask"], b["segment_ids"])
        logits = student.mlm_logits(sequence, b["masked_lm_positions"])
        kl = soft_mlm_loss(logits, b["teacher_topk_ids"], b["teacher_topk_probs"], b["teacher_rest_prob"],
                           b["masked_lm_weights"], 1.0)
        return (tf.argmax(logits, -1, output_type=tf.int32), tf.argmax(student.nsp_logits(sequence), -1,
                                                                       output_type=tf.int32), kl)

    labels, student_top1, teacher_top1 = [], [], []
    nsp_labels, student_nsp, teacher_nsp = [], [], []
    kl_sum = weight_sum = 0.0
    seen = 0
    for batch in labelled_dataset(paths, L, P, k, params.batch_size):
        mlm, nsp, kl = predict(batch)
        real = batch["masked_lm_weights"].numpy() > 0
        labels.append(batch["masked_lm_ids"].numpy()[real])
        student_top1.append(mlm.numpy()[real])
        teacher_top1.append(batch["teacher_topk_ids"].numpy()[..., 0][real])
        nsp_labels.append(batch["next_sentence_labels"].numpy()[:, 0])
        student_nsp.append(nsp.numpy())
        teacher_nsp.append(batch["teacher_nsp_logits"].numpy().argmax(-1))
        kl_sum += float(kl) * real.sum()
        weight_sum += real.sum()
        seen += len(real)
        if params.max_examples and seen >= params.max_examples:
            break
    y, s, t = (np.concatenate(x) for x in (labels, student_top1, teacher_top1))
    ny, ns, nt = (np.concatenate(x) for x in (nsp_labels, student_nsp, teacher_nsp))
    frequent = [token for token, _ in Counter(y.tolist()).most_common(10)]
    rare = ~np.isin(y, frequent)
    most = frequent[0]

    def scores(pred: np.ndarray, nsp_pred: np.ndarray | None) -> dict:
        out = {"mlm_accuracy": float((pred == y).mean()),
               "mlm_accuracy_outside_top10": float((pred == y)[rare].mean()),
               "agreement_with_teacher": float((pred == t).mean())}
        if nsp_pred is not None:
            out["nsp_accuracy"] = float((nsp_pred == ny).mean())
        return out

    report = {
        "examples": seen, "positions": len(y), "most_frequent_token_id": int(most),
        "student": {**scores(s, ns), "kl_from_teacher": kl_sum / max(weight_sum, 1),
                    "parameters": student.parameter_count(), "layers": student_config.num_hidden_layers},
        "teacher": {**scores(t, nt), "parameters": teacher.parameter_count(),
                    "layers": teacher_config.num_hidden_layers},
        "baseline": scores(np.full_like(y, most), None),
    }
    report["student_over_teacher"] = report["student"]["mlm_accuracy"] / max(report["teacher"]["mlm_accuracy"], 1e-9)
    for name, model in (("student", student), ("teacher", teacher)):
        report[name].update(latency(model, params.latency_batch, L, P))
    report["speedup_encoder"] = report["teacher"]["latency_encoder_s"] / report["student"]["latency_encoder_s"]
    report["speedup_with_mlm_head"] = report["teacher"]["latency_mlm_s"] / report["student"]["latency_mlm_s"]
    return report


def latency(model, batch: int, L: int, P: int, repeats: int = 5) -> dict:
    """Best-of-N seconds per batch of full-length sequences: encoder alone, then with the MLM head."""
    import tensorflow as tf

    ids = tf.ones([batch, L], tf.int32) * 1000
    ones = tf.ones([batch, L], tf.int32)
    zeros = tf.zeros([batch, L], tf.int32)
    positions = tf.tile(tf.range(1, P + 1)[None], [batch, 1])
    encoder = tf.function(lambda: model.encode(ids, ones, zeros))
    with_head = tf.function(lambda: model.mlm_logits(model.encode(ids, ones, zeros), positions))
    out = {}
    for key, fn in (("latency_encoder_s", encoder), ("latency_mlm_s", with_head)):
        fn().numpy()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            fn().numpy()
            best = min(best, time.perf_counter() - started)
        out[key] = best
    return out


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["mlm_accuracy", "mlm_accuracy_outside_top10", "agreement_with_teacher"]
    x = np.arange(len(names))
    for offset, who in ((-0.27, "baseline"), (0.0, "student"), (0.27, "teacher")):
        left.bar(x + offset, [report[who].get(n, 0) for n in names], 0.27, label=who)
    left.set_xticks(x, ["top-1", "top-1 outside\n10 most frequent", "agreement\nwith teacher"])
    left.set_ylabel("held-out masked positions")
    left.legend()
    left.set_title(f"{report['positions']:,} held-out masked positions")
    whos = ["student", "teacher"]
    right.bar(np.arange(2) - 0.2, [report[w]["latency_encoder_s"] for w in whos], 0.4, label="encoder")
    right.bar(np.arange(2) + 0.2, [report[w]["latency_mlm_s"] for w in whos], 0.4, label="encoder + MLM head")
    right.set_xticks(np.arange(2), [f"{w}\n{report[w]['layers']} layers, {report[w]['parameters'] / 1e6:.1f} M"
                                    for w in whos])
    right.set_ylabel("seconds per batch")
    right.legend()
    right.set_title(f"encoder {report['speedup_encoder']:.2f}x faster")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
