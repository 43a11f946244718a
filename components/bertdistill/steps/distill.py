"""distill: train a student on the teacher's cached labels.

Reads top to bottom like a training script: config, data, init or resume, optimizer, loop,
export. The student is the teacher's config with fewer layers (or an explicit config),
initialised from evenly spaced teacher layers (DistilBERT) or randomly. The loss is a
weighted sum of the soft masked-LM KL against the cached top-k + rest mass at temperature
T (scaled by T^2), the hard masked-LM cross-entropy on masked_lm_ids, and the
next-sentence losses on the labels and on the teacher's logits.

Checkpoints (weights, AdamW moments, step, loss history) go to <output>/checkpoints/ every
--checkpoint-every steps, each file first and `latest.json` last; a rerun resumes from the
latest one and, since data order and dropout masks are functions of (seed, step), continues
the same loss curve. A NaN loss stops the run naming the step; the last good checkpoint
stays. The trained student lands in <output>/export/ in the teacher folder layout.

    bertdistill distill --teacher data/teachers/minilm-adapted --labels data/runs/X/labels/minilm-k10 \\
        --output data/runs/X/students/s1 --student-layers 3 --steps 300
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bertdistill.errors import StepError
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.progress import Progress
from bertdistill.store import Folder, open_folder, scratch_dir
from bertdistill.teachers import staged_teacher

log = logging.getLogger(__name__)


@dataclass
class DistillParams:
    teacher: str
    labels: str
    output: str
    student_layers: int | None = 3
    student_hidden: int | None = None
    student_config: str | None = None
    student_init: str = "teacher"
    top_k: int = 10
    steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 5e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    temperature: float = 1.0
    soft_mlm_weight: float = 1.0
    hard_mlm_weight: float = 1.0
    nsp_weight: float = 0.5
    soft_nsp_weight: float = 0.5
    checkpoint_every: int = 100
    seed: int = 0
    force: bool = False

    def validate(self) -> None:
        if self.student_init not in ("teacher", "random"):
            raise StepError(f"--student-init must be 'teacher' or 'random', got {self.student_init!r}")
        if min(self.steps, self.batch_size, self.grad_accum, self.checkpoint_every) < 1:
            raise StepError("--steps, --batch-size, --grad-accum and --checkpoint-every must be at least 1")
        if self.temperature <= 0:
            raise StepError(f"--temperature must be positive, got {self.temperature}")


def _label_shards(params: DistillParams, vocab_sha256: str) -> tuple[list[str], dict]:
    from bertdistill.steps.label_teacher import open_labels

    folder = open_folder(params.labels).join("train")
    names = [n for n in folder.list() if n.endswith(".tfrecord")]
    if not names:
        raise StepError(f"{folder.uri} holds no labelled .tfrecord shards: run label-teacher first")
    infos = [open_labels(folder.child_uri(n), vocab_sha256, params.top_k) for n in names]
    return [folder.child_uri(n) for n in names], infos[0]


def run(params: DistillParams) -> Manifest:
    params.validate()
    output = open_folder(params.output)
    fingerprint = {k: v for k, v in asdict(params).items() if k not in ("teacher", "labels", "output", "force")}
    fingerprint["schema"] = 1

    def work(writer: OutputWriter) -> dict:
        from bertdistill.bert.checkpoints import load_teacher

        with staged_teacher(params.teacher) as local:
            teacher_config, teacher_weights, vocab = load_teacher(local, params.teacher)
            vocab_bytes = (local / "vocab.txt").read_bytes()
        shards, info = _label_shards(params, vocab.sha256)
        with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            paths = _stage(shards, Path(tmp))
            summary, config, weights = _train(params, teacher_config, teacher_weights, paths, info, output,
                                              fingerprint)
            export = Path(tmp) / "export"
            from bertdistill.bert.checkpoints import save_teacher

            (Path(tmp) / "vocab.txt").write_bytes(vocab_bytes)
            save_teacher(export, config, weights, Path(tmp) / "vocab.txt")
            for name in sorted(p.name for p in export.iterdir()):
                writer.write_bytes(f"export/{name}", (export / name).read_bytes())
        print(f"distill: {summary['steps']} steps, {summary['student_layers']}-layer student "
              f"({summary['student_parameters'] / 1e6:.1f} M parameters), final loss {summary['final_loss']:.3f} "
              f"in {summary['seconds']:.0f} s -> {output.child_uri('export')}")
        return summary

    return run_step("distill", fingerprint, {"teacher": params.teacher, "labels": params.labels}, output, work,
                    force=params.force)


def _stage(uris: list[str], tmp: Path) -> list[str]:
    from bertdistill.steps.adapt_teacher import _stage_all

    return _stage_all(uris, tmp)


def _student(params: DistillParams, teacher_config, teacher_weights):
    from bertdistill.bert.config import BertConfig
    from bertdistill.student import check_student_config, init_from_teacher, student_config

    if params.student_config:
        config = BertConfig.from_json_file(params.student_config)
        check_student_config(config, teacher_config, params.student_config)
    else:
        config = student_config(teacher_config, params.student_layers, params.student_hidden)
    weights = init_from_teacher(teacher_weights, teacher_config, config) if params.student_init == "teacher" else None
    return config, weights


def _train(params: DistillParams, teacher_config, teacher_weights, paths: list[str], info: dict, output: Folder,
           fingerprint: dict):
    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.losses import masked_lm_loss, next_sentence_loss, soft_mlm_loss, soft_next_sentence_loss
    from bertdistill.optim import AdamW
    from bertdistill.tfdata import labelled_dataset

    config, init = _student(params, teacher_config, teacher_weights)
    model = Bert(config, seed=params.seed)
    if init is not None:
        model.assign(init)
    variables = list(model.weights.values())
    optimizer = AdamW(model.weights, params.learning_rate, params.warmup_steps, params.steps, params.weight_decay)
    history: list[float] = []
    start = last_checkpoint = _resume(output, model, optimizer, history, fingerprint)
    L, P = info["max_seq_length"], info["max_predictions_per_seq"]
    data = iter(labelled_dataset(paths, L, P, params.top_k, params.batch_size, shuffle=True, repeat=True,
                                 seed=params.seed).skip(start * params.grad_accum))
    T = params.temperature

    @tf.function
    def grads_of(b, seed):
        with tf.GradientTape() as tape:
            sequence = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"], training=True, seed=seed)
            logits = model.mlm_logits(sequence, b["masked_lm_positions"])
            nsp = model.nsp_logits(sequence)
            loss = (params.soft_mlm_weight * soft_mlm_loss(logits, b["teacher_topk_ids"], b["teacher_topk_probs"],
                                                           b["teacher_rest_prob"], b["masked_lm_weights"], T)
                    + params.hard_mlm_weight * masked_lm_loss(logits, b["masked_lm_ids"], b["masked_lm_weights"])
                    + params.nsp_weight * next_sentence_loss(nsp, b["next_sentence_labels"][:, 0])
                    + params.soft_nsp_weight * soft_next_sentence_loss(nsp, b["teacher_nsp_logits"], T))
        return loss, tape.gradient(loss, variables)

    @tf.function
    def apply(grads):
        return optimizer.apply(grads)

    progress = Progress(log, "distill", params.steps)
    for step in range(start + 1, params.steps + 1):
        total, accumulated = 0.0, None
        for micro in range(params.grad_accum):
            loss, grads = grads_of(next(data), tf.constant([params.seed, step * params.grad_accum + micro], tf.int64))
            grads = [tf.convert_to_tensor(g) / params.grad_accum for g in grads]
            accumulated = grads if accumulated is None else [a + g for a, g in zip(accumulated, grads, strict=True)]
            total += float(loss) / params.grad_accum
        if not math.isfinite(total):
            raise StepError(f"distill: the loss became {total} at step {step}; stopped. The last good checkpoint "
                            f"(step {last_checkpoint}) is kept in {output.child_uri(CHECKPOINTS)}; lower "
                            "--learning-rate or check the labels")
        apply(accumulated)
        history.append(total)
        if step % params.checkpoint_every == 0 or step == params.steps:
            _checkpoint(output, model, optimizer, step, history, fingerprint)
            last_checkpoint = step
        if step % 25 == 0 or step == params.steps:
            log.info("distill: step %d/%d loss %.4f", step, params.steps, total)
        progress.update(step, " steps")
    summary = {"steps": params.steps, "resumed_from": start, "losses": [round(x, 6) for x in history],
               "final_loss": float(np.mean(history[-10:])), "seconds": round(progress.elapsed, 1),
               "student_layers": config.num_hidden_layers, "student_parameters": model.parameter_count(),
               "student_config": asdict(config)}
    return summary, config, model.numpy_weights()


CHECKPOINTS = "checkpoints"


def _checkpoint(output: Folder, model, optimizer, step: int, history: list[float], fingerprint: dict) -> None:
    """Weights, moments and step in one safetensors file, then `latest.json` naming it (the commit)."""
    from safetensors.numpy import save as save_bytes

    arrays = {f"w/{n}": v.numpy() for n, v in model.weights.items()}
    arrays.update({f"m/{n}": m.numpy() for n, m in zip(optimizer.names, optimizer.m, strict=True)})
    arrays.update({f"v/{n}": v.numpy() for n, v in zip(optimizer.names, optimizer.v, strict=True)})
    name = f"{CHECKPOINTS}/ckpt-{step:07d}.safetensors"
    output.write_bytes(name, save_bytes(arrays, metadata={"step": str(step), "history": json.dumps(history)}))
    latest = {"step": step, "file": name, "params": fingerprint}
    output.write_bytes(f"{CHECKPOINTS}/latest.json", json.dumps(latest, sort_keys=True).encode())


def _resume(output: Folder, model, optimizer, history: list[float], fingerprint: dict) -> int:
    """The step to continue from: that of the latest checkpoint of a run with these parameters, else 0."""
    from safetensors import safe_open

    if not output.exists(f"{CHECKPOINTS}/latest.json"):
        return 0
    latest = json.loads(output.read_bytes(f"{CHECKPOINTS}/latest.json"))
    if latest.get("params") != json.loads(json.dumps(fingerprint)):
        log.info("distill: checkpoints in %s belong to other parameters; starting afresh", output.uri)
        return 0
    with output.local_copy(latest["file"]) as path, safe_open(str(path), framework="numpy") as f:
        for name, var in model.weights.items():
            var.assign(f.get_tensor(f"w/{name}"))
        for name, m, v in zip(optimizer.names, optimizer.m, optimizer.v, strict=True):
            m.assign(f.get_tensor(f"m/{name}"))
            v.assign(f.get_tensor(f"v/{name}"))
        meta = f.metadata()
    optimizer.step.assign(int(meta["step"]))
    history.extend(json.loads(meta["history"]))
    log.info("distill: resuming from %s (step %d)", output.child_uri(latest["file"]), latest["step"])
    return int(latest["step"])
