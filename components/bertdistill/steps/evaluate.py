"""evaluate: the student against its teacher and its no-teacher control on the held-out shards.

Accuracy alone misleads on masked-LM: always answering the most frequent token ("the")
scores about 5% here, and a weak teacher agrees with such a student 44% of the time. So
the report puts every figure beside that baseline and adds accuracy on the tokens outside
the 10 most frequent. What distillation bought is measured against the control, the same
student trained on the same data and steps without the teacher (`--control`): the gain is
the student's held-out top-1 minus the control's, with a paired bootstrap 95% interval over
the held-out positions, and a verdict in words (a teacher weaker than the control is named
as such). Calibration: expected calibration error of each model's top-1 (15 equal bins),
since truncated teacher caches are known to hurt it.

The teacher's predictions come from the cached labels (its top-1 is the first cached id,
its confidence the first cached probability), so only the students run over the data; the
models are timed on one batch for latency, encoder alone and with the masked-LM head.

The student is also exported to ONNX (onnx_model.py), fp32 and int8, and both are scored on the
same held-out positions and timed in the same rounds: the fp32 export must reproduce the student's
logits within 1e-4, and the int8 one is marked for serving when it loses at most half a point of
fp32's top-1.

With `--temporal` (the labelled examples of the articles new or changed since last month that
build-corpus kept out of training), every model is also scored there: the report's `temporal`
says whether this month's student learnt what changed better than last month's champion.

Output: report.json, report.png and onnx/ (model.onnx, model.int8.onnx) in the output folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertdistill import prediction_cache as predictions
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.onnx_model import FOLDER as ONNX
from bertdistill.onnx_scoring import export_onnx, onnx_parity, onnx_report
from bertdistill.records import TOP_K
from bertdistill.report_chart import chart
from bertdistill.report_figures import calibration_error, headline, paired_gain, temporal_verdict, verdict
from bertdistill.shards import labelled_shards
from bertdistill.store import open_folder, scratch_dir
from bertdistill.teachers import committed_export, committed_teacher, export_weights_sha256, staged_teacher

log = logging.getLogger(__name__)



@dataclass
class EvaluateParams:
    teacher: str = flag(help="teacher folder URI (the one that made the labels)")
    student: str = flag(help="student folder URI (distill's output, with export/)")
    heldout: str = flag(help="folder URI of the held-out labelled shards")
    output: str = flag(help="report folder URI (report.json, report.png)")
    control: str | None = flag(None, help="the no-teacher control's student folder URI (distill with "
                               "--soft-mlm-weight 0 --soft-nsp-weight 0, same init, data and steps): the report "
                               "adds the distillation gain")
    champion: str | None = flag(None, metavar="MODEL_NAME", help="registered model whose current champion is "
                                "scored on the same held-out examples when its vocab and sequence length match "
                                "(publish then decides on those figures)")
    temporal: str | None = flag(None, help="folder URI of the temporal held-out labelled shard (articles new or "
                                "changed since last month, kept out of training): every model is scored there too")
    top_k: int = flag(TOP_K, minimum=1, help="k the labels must have been made with")
    batch_size: int = flag(64, minimum=1, help="examples per evaluation batch")
    max_examples: int = flag(50_000, help="evaluate on the first N held-out examples (0: all); the default bounds "
                             "evaluate's time at any dump size (50,000 examples: about 1 M masked positions at "
                             "128 tokens)")
    latency_batch: int = flag(32, minimum=1, help="batch size of the latency measurement")
    force: bool = False


def run(params: EvaluateParams) -> Manifest:
    output = open_folder(params.output)
    fingerprint = {k: v for k, v in params.__dict__.items() if k not in ("teacher", "student", "heldout", "output",
                                                                        "control", "champion", "temporal", "force")}
    fingerprint["schema"] = 4
    champion = current_champion(params.champion) if params.champion else None
    if champion is not None:  # a new champion since the last report makes it stale
        fingerprint["champion"] = {"model": params.champion, "version": champion["version"]}
    inputs = {"teacher": params.teacher, "student": params.student, "heldout": params.heldout}
    if params.control:
        inputs["control"] = params.control
    if params.temporal:
        inputs["temporal"] = params.temporal
    # every input checked finished before the step starts (manifest.committed_input)
    committed_teacher(params.teacher)
    exports = {role: committed_export(uri) for role, uri in (("student", params.student), ("control", params.control))
               if uri is not None}
    paths = labelled_shards(params.heldout, "held-out")
    temporal = labelled_shards(params.temporal, "temporal held-out") if params.temporal else []

    def work(writer: OutputWriter) -> dict:
        from bertdistill.bert.checkpoints import load_teacher
        from bertdistill.shards import open_labels

        with staged_teacher(params.teacher) as local:
            teacher_config, teacher_weights, vocab = load_teacher(local, params.teacher)
        students = {}
        for role, export in exports.items():
            with staged_teacher(export) as local:
                config, weights, student_vocab = load_teacher(local, export)
            if student_vocab.sha256 != vocab.sha256:
                raise StepError(f"{role} {inputs[role]} uses another vocab than teacher {params.teacher}")
            students[role] = (config, weights)
        info = open_labels(paths[0], vocab.sha256, params.top_k)
        for path in paths[1:] + temporal:
            open_labels(path, vocab.sha256, params.top_k)
        weights = {"student": export_weights_sha256(exports["student"])}  # the models whose predictions are kept
        known = {}
        if champion is not None and champion["export"] != exports["student"]:
            if champion["vocab_sha256"] == vocab.sha256 and champion["max_seq_length"] == info["max_seq_length"]:
                weights["champion"] = export_weights_sha256(champion["export"])  # refused unless distill finished it
                with staged_teacher(champion["export"]) as local:
                    students["champion"] = load_teacher(local, champion["export"])[:2]
                if champion.get("report") and not params.force:  # its predictions as that month's student
                    known["champion"] = predictions.previous(champion["report"], weights["champion"])
            else:
                log.info("champion %s version %s was trained on another vocab or sequence length: not scored",
                         params.champion, champion["version"])
        with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            onnx_files = export_onnx(*students["student"], Path(tmp) / ONNX)
            report, kept = evaluate(students, teacher_config, teacher_weights, paths, info, params, onnx_files,
                                    temporal, known)
            if "champion" in report:
                report["champion"]["version"] = champion["version"]
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            chart(report, Path(tmp) / "report.png")
            for name in ("report.json", "report.png"):
                writer.write_bytes(name, (Path(tmp) / name).read_bytes())
            for path in onnx_files.values():
                writer.write_bytes(f"{ONNX}/{path.name}", path.read_bytes())
            for role, data in kept.items():
                writer.write_bytes(predictions.file_name(weights[role]), data)
        s, t = report["student"], report["teacher"]
        control = f" vs control {report['control']['mlm_accuracy']:.1%}" if "control" in report else ""
        o = report["onnx"]
        print(f"evaluate: {report['positions']:,} held-out masked positions; masked-LM top-1 student "
              f"{s['mlm_accuracy']:.1%}{control} vs teacher {t['mlm_accuracy']:.1%} "
              f"({report['student_over_teacher']:.1%} kept; most-frequent-token baseline "
              f"{report['baseline']['mlm_accuracy']:.1%}); encoder {report['speedup_encoder']:.2f}x faster "
              f"-> {output.uri}\nevaluate: ONNX int8 top-1 {o['int8']['mlm_accuracy']:.2%} vs fp32 "
              f"{o['fp32']['mlm_accuracy']:.2%} ({o['int8_minus_fp32_points']:+.2f} points; serves {o['serves']}); "
              f"{report['speedup_int8_with_mlm_head']:.2f}x the teacher's speed\nevaluate: {report['verdict']}")
        if "temporal" in report:
            print(f"evaluate: {report['temporal']['verdict']}")
        if "predictions_reused" in report.get("champion", {}):
            print(f"evaluate: the champion's predictions on {report['champion']['predictions_reused']:,} of "
                  f"{report['examples']:,} held-out examples copied from its own report")
        return report | {"parent_metrics": headline(report), "parent_tags": {"verdict": report["verdict"]}}

    return run_step("evaluate", fingerprint, inputs, output, work, force=params.force)


def evaluate(students: dict[str, tuple], teacher_config, teacher_weights, paths: list[str], info: dict,
             params: EvaluateParams, onnx_files: dict[str, Path] | None = None, temporal: list[str] = (),
             known: dict[str, dict] | None = None) -> tuple[dict, dict[str, bytes]]:
    """(the report, the held-out predictions of the student and the champion as prediction_cache
    files). students: role ("student", "control", "champion") -> (config, weights); onnx_files: the
    student's ONNX exports (precision -> file), scored and timed beside it; temporal: the temporal
    held-out shards, where every model's top-1 is scored too; known: role -> that model's earlier
    predictions (prediction_cache), copied for the examples they cover."""
    import tensorflow as tf

    from bertdistill import onnx_model
    from bertdistill.bert.model import Bert
    from bertdistill.losses import soft_mlm_kl
    from bertdistill.tfdata import labelled_dataset

    models = {}
    for role, (config, weights) in students.items():
        models[role] = Bert(config, weights=weights)
    teacher = Bert(teacher_config, weights=teacher_weights)
    L, P, k = info["max_seq_length"], info["max_predictions_per_seq"], params.top_k

    def predictor(model):
        @tf.function
        def predict(b):
            sequence = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"])
            logits = model.mlm_logits(sequence, b["masked_lm_positions"])
            kl = soft_mlm_kl(logits, b["teacher_topk_ids"], b["teacher_topk_probs"], b["teacher_rest_prob"])
            return (tf.argmax(logits, -1, output_type=tf.int32), tf.reduce_max(tf.nn.softmax(logits), -1),
                    tf.argmax(model.nsp_logits(sequence), -1, output_type=tf.int32),
                    tf.reduce_sum(kl * b["masked_lm_weights"], -1))

        def run(batch: dict) -> tuple[np.ndarray, ...]:  # one input structure, so one trace per batch shape
            return tuple(x.numpy() for x in predict({name: batch[name] for name in predictions.INPUTS}))
        return run

    predictors = {role: predictor(model) for role, model in models.items()}
    reusing = {role: predictions.ReusingPredictor(predictors[role], found, params.batch_size)
               for role, found in (known or {}).items() if found and role in predictors}
    sessions = {precision: onnx_model.session(path) for precision, path in (onnx_files or {}).items()}
    parity = None
    columns: dict[str, list[np.ndarray]] = {}
    outputs: dict[str, list[tuple[np.ndarray, ...]]] = {role: [] for role in models}
    reals: list[np.ndarray] = []
    keys: list[bytes] = []
    seen = 0

    def add(name: str, value: np.ndarray) -> None:
        columns.setdefault(name, []).append(value)

    for batch in labelled_dataset(paths, L, P, k, params.batch_size):
        arrays = {name: value.numpy() for name, value in batch.items()}
        real = arrays["masked_lm_weights"] > 0
        reals.append(real)
        batch_keys = predictions.example_keys(arrays)
        keys += batch_keys
        add("labels", arrays["masked_lm_ids"][real])
        add("teacher_top1", arrays["teacher_topk_ids"][..., 0][real])
        add("teacher_confidence", arrays["teacher_topk_probs"][..., 0][real])
        add("nsp_labels", arrays["next_sentence_labels"][:, 0])
        add("teacher_nsp", arrays["teacher_nsp_logits"].argmax(-1))
        for role, predict in predictors.items():
            if role in reusing:
                reusing[role].add(arrays, batch_keys)
            else:
                outputs[role].append(predict(batch))
        if sessions:
            feeds = onnx_model.feeds(*(arrays[k] for k in ("input_ids", "input_mask", "segment_ids",
                                                           "masked_lm_positions")))
            if parity is None:
                parity = onnx_parity(models["student"], sessions["fp32"], batch, feeds)
            for precision, session in sessions.items():
                add(f"onnx_{precision}_top1", session.run(["mlm_logits"], feeds)[0].argmax(-1)[real])
        seen += len(real)
        if params.max_examples and seen >= params.max_examples:
            break
    for role, predictor_ in reusing.items():
        outputs[role] = predictor_.outputs()
    for role, batches in outputs.items():
        for i, name in enumerate(("top1", "confidence")):
            add(f"{role}_{name}", np.concatenate([out[i][real] for out, real in zip(batches, reals, strict=True)]))
        add(f"{role}_nsp", np.concatenate([out[2] for out in batches]))
    col = {name: np.concatenate(parts) for name, parts in columns.items()}
    y, t = col["labels"], col["teacher_top1"]
    frequent = [token for token, _ in Counter(y.tolist()).most_common(10)]
    rare = ~np.isin(y, frequent)
    most = frequent[0]

    def scores(pred: np.ndarray, confidence: np.ndarray | None, nsp_pred: np.ndarray | None) -> dict:
        out = {"mlm_accuracy": float((pred == y).mean()),
               "mlm_accuracy_outside_top10": float((pred == y)[rare].mean()),
               "agreement_with_teacher": float((pred == t).mean())}
        if confidence is not None:
            out["mlm_calibration_error"] = calibration_error(confidence, pred == y)
        if nsp_pred is not None:
            out["nsp_accuracy"] = float((nsp_pred == col["nsp_labels"]).mean())
        return out

    report: dict = {"examples": seen, "positions": len(y), "most_frequent_token_id": int(most)}
    for role, model in models.items():
        kl = sum(float(out[3].sum()) for out in outputs[role])
        report[role] = {**scores(col[f"{role}_top1"], col[f"{role}_confidence"], col[f"{role}_nsp"]),
                        "kl_from_teacher": kl / max(len(y), 1),
                        "parameters": model.parameter_count(), "layers": students[role][0].num_hidden_layers}
        if role in reusing:
            report[role]["predictions_reused"] = reusing[role].reused
    saved = {role: predictions.to_bytes(keys, outputs[role]) for role in ("student", "champion") if role in outputs}
    report["teacher"] = {**scores(t, col["teacher_confidence"], col["teacher_nsp"]),
                         "parameters": teacher.parameter_count(), "layers": teacher_config.num_hidden_layers}
    report["baseline"] = scores(np.full_like(y, most), None, None)
    report["student_over_teacher"] = report["student"]["mlm_accuracy"] / max(report["teacher"]["mlm_accuracy"], 1e-9)
    for role, key in (("control", "distillation_gain"), ("champion", "gain_over_champion")):
        if role in models:
            gain, low, high = paired_gain(col["student_top1"] == y, col[f"{role}_top1"] == y)
            report[key] = {"mlm_accuracy": gain, "ci95_low": low, "ci95_high": high}
    report["max_seq_length"] = L
    report["latency_batch"] = params.latency_batch
    report["verdict"] = verdict(report)
    if temporal:
        report["temporal"] = temporal_scores(predictors, temporal, (L, P, k), params)
    timed = latency({"student": models["student"], "teacher": teacher}, params.latency_batch, L, P, sessions)
    for name in ("student", "teacher"):
        report[name].update(timed[name])
    report["speedup_encoder"] = report["teacher"]["latency_encoder_s"] / report["student"]["latency_encoder_s"]
    report["speedup_with_mlm_head"] = report["teacher"]["latency_mlm_s"] / report["student"]["latency_mlm_s"]
    if sessions:
        report["onnx"] = onnx_report(col, parity, onnx_files, {p: timed[f"onnx_{p}"] for p in onnx_files})
        report["speedup_int8_with_mlm_head"] = (report["teacher"]["latency_mlm_s"]
                                                / report["onnx"]["int8"]["latency_mlm_s"])
    return report, saved


def temporal_scores(predictors: dict, paths: list[str], shape: tuple[int, int, int], params: EvaluateParams) -> dict:
    """Top-1 of every model (the teacher from its labels) on the temporal held-out, the student's gain
    over the champion and the control there, and a sentence saying whether this month taught it what changed."""
    from bertdistill.tfdata import labelled_dataset

    hits: dict[str, list[np.ndarray]] = {"teacher": []}
    seen = 0
    for batch in labelled_dataset(paths, *shape, params.batch_size):
        real = batch["masked_lm_weights"].numpy() > 0
        y = batch["masked_lm_ids"].numpy()[real]
        hits["teacher"].append(batch["teacher_topk_ids"].numpy()[..., 0][real] == y)
        for role, predict in predictors.items():
            hits.setdefault(role, []).append(predict(batch)[0][real] == y)
        seen += len(real)
        if params.max_examples and seen >= params.max_examples:
            break
    correct = {role: np.concatenate(parts) for role, parts in hits.items()}
    out: dict = {"examples": seen, "positions": len(correct["teacher"])}
    out |= {role: {"mlm_accuracy": float(c.mean())} for role, c in correct.items()}
    for role, key in (("control", "distillation_gain"), ("champion", "gain_over_champion")):
        if role in correct:
            gain, low, high = paired_gain(correct["student"], correct[role])
            out[key] = {"mlm_accuracy": gain, "ci95_low": low, "ci95_high": high}
    out["verdict"] = temporal_verdict(out)
    return out


def current_champion(model_name: str) -> dict | None:
    """The registered model's champion as publish tagged it (export folder, vocab, sequence length);
    None without tracking, without a champion, or for a version that predates those tags."""
    from bertdistill import tracking

    if not tracking.enabled():
        return None
    from mlflow.exceptions import MlflowException

    try:
        version = tracking.client().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    tags = version.tags
    if not {"bertdistill.export", "vocab_sha256", "max_seq_length"} <= set(tags):
        return None
    return {"version": int(version.version), "export": tags["bertdistill.export"],
            "vocab_sha256": tags["vocab_sha256"], "max_seq_length": int(tags["max_seq_length"]),
            "report": tags.get("bertdistill.report")}


def latency(models: dict, batch: int, L: int, P: int, sessions: dict | None = None,
            repeats: int = 15) -> dict[str, dict]:
    """Best-of-N seconds per batch of full-length sequences, encoder alone and with the MLM head,
    the models taking turns (timing.py). Timed one model after the other (best of 5 each), the
    3-of-6-layer student measured 1.72x and 1.78x in two demo-sized runs on 2 cores, where its
    encoder does half the teacher's work (the layers alone: 233 ms for 3, 465 ms for 6, 2 ms for
    the embeddings)."""
    import tensorflow as tf

    from bertdistill.timing import take_turns

    ids = tf.ones([batch, L], tf.int32) * 1000
    ones = tf.ones([batch, L], tf.int32)
    zeros = tf.zeros([batch, L], tf.int32)
    positions = tf.tile(tf.range(1, P + 1)[None], [batch, 1])
    calls = {}
    for name, model in models.items():
        calls[(name, "latency_encoder_s")] = tf.function(lambda m=model: m.encode(ids, ones, zeros))
        calls[(name, "latency_mlm_s")] = tf.function(
            lambda m=model: m.mlm_logits(m.encode(ids, ones, zeros), positions))
    calls = {key: (lambda fn=fn: fn().numpy()) for key, fn in calls.items()}
    if sessions:
        from bertdistill.onnx_model import feeds

        inputs = feeds(ids.numpy(), ones.numpy(), zeros.numpy(), positions.numpy())
        for precision, session in sessions.items():
            calls[(f"onnx_{precision}", "latency_mlm_s")] = lambda s=session: s.run(["mlm_logits"], inputs)
    out: dict[str, dict] = {name: {} for name, _ in calls}
    for (name, key), seconds in take_turns(calls, repeats).items():
        out[name][key] = min(seconds)
    return out
