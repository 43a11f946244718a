"""distill: train a student on the teacher's cached labels.

Reads top to bottom like a training script: config, data, init or resume, optimizer, loop,
export. The student is the teacher's config with fewer layers (or an explicit config),
initialised from evenly spaced teacher layers (DistilBERT) or randomly. The loss is a
weighted sum of the soft masked-LM KL against the cached top-k + rest mass at temperature
T (scaled by T^2), the hard masked-LM cross-entropy on masked_lm_ids, and the
next-sentence losses on the labels and on the teacher's logits.

Checkpoints (weights, AdamW moments, step, loss history) go to <output>/checkpoints/ every
--checkpoint-every steps but not after the last one (the export follows it), each file first,
`latest.json` last, then the earlier files deleted; a rerun resumes from the
latest one and, since data order and dropout masks are functions of (seed, step), continues
the same loss curve. A NaN loss stops the run naming the step; the last good checkpoint
stays. The trained student lands in <output>/export/ in the teacher folder layout.

A monthly warm start (`--init-from` last month's champion) can train on what changed: with
`--fresh` (the labelled shard of the month's new and changed articles) each example is drawn
from it with probability `--fresh-share`, else from the train shards, the replay (the DAG labels
them with label-teacher --replay: unchanged articles' examples only; TemporalWiki's diff plus
replay): a fraction of the steps then meets every new article many times instead of a few of
them once.

    bertdistill distill --teacher T --labels LABELS --output OUT --student-layers 3 --steps 300
    horovodrun -np 2 bertdistill distill ... --grad-accum 2          # 2 ranks, same global batch
    mpirun -np 8 -H a:4,b:4 bertdistill distill ... --grad-accum 8   # 2 machines x 4 ranks
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bertdistill import tracking
from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, find_done, run_step
from bertdistill.progress import Progress
from bertdistill.records import TOP_K
from bertdistill.shards import labelled_shards
from bertdistill.store import Folder, open_folder, scratch_dir
from bertdistill.teachers import committed_export, committed_teacher, staged_teacher
from bertdistill.warmup import warmup_length

log = logging.getLogger(__name__)


@dataclass
class DistillParams:
    teacher: str = flag(help="teacher folder URI (the one that made the labels)")
    labels: str = flag(help="labels folder URI with train/ labelled shards")
    output: str = flag(help="student folder URI: checkpoints/ and export/")
    student_layers: int | None = flag(3, minimum=1, help="student layers (teacher's config otherwise)")
    student_hidden: int | None = flag(None, minimum=1, help="student hidden size (default: teacher's)")
    student_config: str | None = flag(None, help="explicit student config.json (overrides the two above)")
    student_init: str = flag("teacher", choices=("teacher", "random"),
                             help="start from evenly spaced teacher layers (DistilBERT) or random weights")
    init_from: str | None = flag(None, metavar="STUDENT", help="warm start: start from this student folder's "
                                 "export/ (last month's champion) instead of --student-init; it must have this "
                                 "student's shape and the teacher's vocab")
    fresh: str | None = flag(None, help="folder URI of the labelled shard of the articles new or changed since "
                             "last month (build-corpus' fresh/): --fresh-share of the examples come from it")
    fresh_share: float = flag(0.5, help="with --fresh: the share of examples drawn from it (the rest replay the "
                              "train shards)")
    top_k: int = flag(TOP_K, minimum=1, help="k the labels must have been made with")
    steps: int = flag(300, minimum=1, help="optimizer steps")
    batch_size: int = flag(32, minimum=1, help="examples per micro-batch")
    grad_accum: int = flag(1, minimum=1, help="micro-batches per optimizer step over all ranks (a multiple of the "
                           "rank count); global batch = batch-size x grad-accum at any scale")
    learning_rate: float = flag(5e-4, help="peak learning rate (AdamW)")
    warmup_steps: int | None = flag(None, minimum=0, help="linear warm-up steps (default: --warmup-fraction of "
                                    "--steps)")
    warmup_fraction: float = flag(0.1, help="linear warm-up as a fraction of --steps, unless --warmup-steps is "
                                  "given: the learning rate rises to its peak, then decays linearly to 0")
    weight_decay: float = flag(0.01, help="AdamW weight decay")
    temperature: float = flag(1.0, help="distillation temperature T")
    soft_mlm_weight: float = flag(1.0, help="weight of T^2 KL on the cached top-k")
    hard_mlm_weight: float = flag(1.0, help="weight of cross-entropy on masked_lm_ids")
    nsp_weight: float = flag(0.5, help="weight of next-sentence loss on the labels")
    soft_nsp_weight: float = flag(0.5, help="weight of KL on the teacher's NSP logits (both soft weights 0: the "
                                  "no-teacher control, hard labels only)")
    checkpoint_every: int = flag(100, minimum=1, help="steps between checkpoints")
    seed: int = flag(0, help="seed: data order, dropout masks, random init")
    lr_scaling: str = flag("none", choices=("none", "linear"), help="linear: multiply the learning rate by "
                           "grad-accum, the global batch over batch-size (the same at any rank count)")
    threads: int = flag(0, help="TensorFlow intra-op threads per process (0: default)")
    force: bool = False

    def validate(self) -> None:
        if self.student_init not in ("teacher", "random"):
            raise StepError(f"--student-init must be 'teacher' or 'random', got {self.student_init!r}")
        if min(self.steps, self.batch_size, self.grad_accum, self.checkpoint_every) < 1:
            raise StepError("--steps, --batch-size, --grad-accum and --checkpoint-every must be at least 1")
        if self.lr_scaling not in ("none", "linear"):
            raise StepError(f"--lr-scaling must be 'none' or 'linear', got {self.lr_scaling!r}")
        if not 0 <= self.fresh_share < 1:
            raise StepError(f"--fresh-share must be at least 0 and below 1 (the rest replays the train shards), got "
                            f"{self.fresh_share}")
        if self.temperature <= 0:
            raise StepError(f"--temperature must be positive, got {self.temperature}")
        self.warmup()  # refuses a warm-up that leaves no step to decay in

    def warmup(self) -> int:
        """The warm-up length in steps (warmup.py: a fraction of --steps unless --warmup-steps is given)."""
        return warmup_length(self.steps, self.warmup_steps, self.warmup_fraction)


def run(params: DistillParams) -> Manifest | None:
    """On rank 0: the step, manifest and export included. On other ranks: training in lockstep,
    writing nothing (they return None)."""
    from bertdistill.parallel import init_world

    params.validate()
    world = init_world()
    if params.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(params.threads)
        tf.config.threading.set_inter_op_parallelism_threads(params.threads)
    if not world.master:
        logging.getLogger("bertdistill").setLevel(logging.WARNING)
    output = open_folder(params.output)
    fingerprint = {k: v for k, v in asdict(params).items() if k not in ("teacher", "labels", "output", "force",
                                                                          "threads", "warmup_fraction", "fresh")}
    fingerprint["warmup_steps"] = params.warmup()  # what shapes the student, however it was asked for
    fingerprint["schema"] = 1
    inputs = {"teacher": params.teacher, "labels": params.labels}
    committed_teacher(params.teacher)
    shards = labelled_shards(open_folder(params.labels).child_uri("train"), "train")
    if params.init_from:
        inputs["init_from"] = committed_export(params.init_from)
    fresh = labelled_shards(params.fresh, "fresh") if params.fresh else []
    if fresh:
        inputs["fresh"] = params.fresh
    else:
        fingerprint["fresh_share"] = 0.0  # no fresh shard: the whole month only, whatever the share

    def work(writer: OutputWriter | None) -> dict:
        from bertdistill.bert.checkpoints import load_teacher, save_teacher
        from bertdistill.shards import open_labels

        with staged_teacher(params.teacher) as local:
            teacher_config, teacher_weights, vocab = load_teacher(local, params.teacher)
            vocab_bytes = (local / "vocab.txt").read_bytes()
        infos = [open_labels(shard, vocab.sha256, params.top_k) for shard in shards + fresh]  # this vocab and k
        if fresh and not sum(i["examples"] for i in infos[len(shards):]):
            log.warning("distill: %s holds no examples (nothing new or changed trains this month); training on "
                        "the train shards only", params.fresh)
            fresh.clear()
        summary, config, weights = _train(params, world, teacher_config, teacher_weights, shards, infos[0], output,
                                          fingerprint, fresh)
        if writer is None:
            return summary
        with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            export = Path(tmp) / "export"
            (Path(tmp) / "vocab.txt").write_bytes(vocab_bytes)
            save_teacher(export, config, weights, Path(tmp) / "vocab.txt")
            for name in sorted(p.name for p in export.iterdir()):
                writer.write_bytes(f"export/{name}", (export / name).read_bytes())
        print(f"distill: {summary['steps']} steps on {world.size} rank(s), {summary['student_layers']}-layer student "
              f"({summary['student_parameters'] / 1e6:.1f} M parameters), final loss {summary['final_loss']:.3f} "
              f"in {summary['seconds']:.0f} s -> {output.child_uri('export')}")
        return summary

    if world.master:
        return run_step("distill", fingerprint, inputs, output, work, force=params.force)
    if params.force or not find_done("distill", fingerprint, inputs, output)[2]:
        work(None)
    return None


def peak_learning_rate(params: DistillParams) -> float:
    """The learning rate for the global batch. It is batch_size x grad_accum whatever the rank count
    (ranks split the micro-batches), so linear scaling follows grad_accum, never the ranks."""
    return params.learning_rate * (params.grad_accum if params.lr_scaling == "linear" else 1)


def _label_groups(shards: list[str], world, micro_batches: int) -> list[list[str]]:
    """Shards of each global micro-batch g: shards[g::G]. The same at any number of ranks, so a
    2-rank run sees the data a 1-rank run with the same global batch sees."""
    if micro_batches % world.size:
        raise StepError(f"--grad-accum {micro_batches} (micro-batches per step, over all ranks) is not a multiple "
                        f"of the {world.size} ranks")
    if len(shards) < micro_batches:
        raise StepError(f"{len(shards)} labelled train shard(s) for {micro_batches} micro-batches per step over "
                        f"{world.size} rank(s): each reads its own shards, so make at least {micro_batches} shards "
                        "(build-corpus --train-shards) or use fewer ranks")
    return [shards[g::micro_batches] for g in range(micro_batches)]


def _student(params: DistillParams, teacher_config, teacher_weights, teacher_vocab_sha256: str):
    from bertdistill.bert.config import BertConfig
    from bertdistill.student import check_student_config, init_from_teacher, student_config

    if params.student_config:
        config = BertConfig.from_json_file(params.student_config)
        check_student_config(config, teacher_config, params.student_config)
    else:
        config = student_config(teacher_config, params.student_layers, params.student_hidden)
    if params.init_from:
        return config, warm_start(params.init_from, config, teacher_vocab_sha256)
    weights = init_from_teacher(teacher_weights, teacher_config, config) if params.student_init == "teacher" else None
    return config, weights


def warm_start(student_uri: str, config, vocab_sha256: str) -> dict:
    """The weights of a student published before (its export/), refused unless it is this student's shape
    and was trained on the teacher's vocab: a warm start continues that model, it cannot reshape it."""
    from dataclasses import asdict

    from bertdistill.bert.checkpoints import load_teacher

    export = open_folder(student_uri).child_uri("export")
    with staged_teacher(export) as local:
        theirs, weights, vocab = load_teacher(local, export)
    if vocab.sha256 != vocab_sha256:
        raise StepError(f"--init-from {student_uri} was trained on another vocab than the teacher's: a warm start "
                        "needs the same vocab; start cold (leave --init-from out)")
    differ = {k: (v, asdict(config)[k]) for k, v in asdict(theirs).items()
              if k not in ("hidden_dropout_prob", "attention_probs_dropout_prob") and asdict(config)[k] != v}
    if differ:
        shown = ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in sorted(differ.items()))
        raise StepError(f"--init-from {student_uri} is not this student's shape ({shown}): a warm start needs the "
                        "same shape; match --student-layers/--student-hidden to it or start cold")
    return weights


def _train(params: DistillParams, world, teacher_config, teacher_weights, shards: list[str], info: dict,
           output: Folder, fingerprint: dict, fresh: list[str]):
    import hashlib

    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.device import accelerator
    from bertdistill.losses import masked_lm_loss, next_sentence_loss, soft_mlm_loss, soft_next_sentence_loss
    from bertdistill.optim import AdamW
    from bertdistill.tfdata import labelled_dataset

    G = params.grad_accum
    groups = _label_groups(shards, world, G)
    mine = range(world.rank * G // world.size, (world.rank + 1) * G // world.size)
    config, init = _student(params, teacher_config, teacher_weights, info["vocab_sha256"])
    # Mixed precision on a GPU: bfloat16 compute, float32 variables and AdamW moments (bfloat16
    # keeps float32's exponent range, so no loss scaling); plain float32 on a CPU.
    _, dtype = accelerator()
    model = Bert(config, seed=params.seed, compute_dtype=tf.dtypes.as_dtype(dtype), weights=init)
    variables = list(model.weights.values())
    lr = peak_learning_rate(params)
    optimizer = AdamW(model.weights, lr, params.warmup(), params.steps, params.weight_decay)
    log.info("distill: learning rate up to %.2g over %d warm-up step(s), then linearly down to 0 at step %d",
             lr, params.warmup(), params.steps)
    history: list[float] = []
    start = last_checkpoint = _resume(output, model, optimizer, history, fingerprint)
    world.broadcast(variables + optimizer.m + optimizer.v)
    L, P = info["max_seq_length"], info["max_predictions_per_seq"]
    share = params.fresh_share if fresh else 0.0
    data = {g: iter(labelled_dataset(groups[g], L, P, params.top_k, params.batch_size, shuffle=True, repeat=True,
                                     seed=params.seed + g, mixed_in=fresh, mixed_share=share).skip(start))
            for g in mine}
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
        # Averaged over the ranks here (Horovod's allreduce); over this rank's micro-batches below.
        return loss, world.tape(tape).gradient(loss, variables)

    @tf.function
    def apply(grads):
        return optimizer.apply(grads)

    progress = Progress(log, "distill", params.steps)
    step_seconds: list[float] = []
    for step in range(start + 1, params.steps + 1):
        began = time.perf_counter()
        local_loss, accumulated = 0.0, None
        for g in mine:
            loss, grads = grads_of(next(data[g]), tf.constant([params.seed, step * G + g], tf.int64))
            grads = [tf.convert_to_tensor(x) / len(mine) for x in grads]
            accumulated = grads if accumulated is None else [a + x for a, x in zip(accumulated, grads, strict=True)]
            local_loss += float(loss) / len(mine)
        total = world.mean(local_loss)
        if not math.isfinite(total):
            raise StepError(f"distill: the loss became {total} at step {step}; stopped. The last good checkpoint "
                            f"(step {last_checkpoint}) is kept in {output.child_uri(CHECKPOINTS)}; lower "
                            "--learning-rate or check the labels")
        rate, grad_norm = apply(accumulated)
        history.append(total)
        step_seconds.append(round(time.perf_counter() - began, 4))
        # none after the last step: the export follows at once, and nothing resumes a finished run
        if world.master and step % params.checkpoint_every == 0 and step < params.steps:
            _checkpoint(output, model, optimizer, step, history, fingerprint)
            last_checkpoint = step
        if step % 25 == 0 or step == params.steps:
            log.info("distill: step %d/%d loss %.4f", step, params.steps, total)
        if world.master:
            tracking.log_live({"loss": total, "learning_rate": float(rate), "gradient_norm": float(grad_norm)}, step)
        progress.update(step, " steps")
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in variables)).hexdigest()
    summary = {"steps": params.steps, "resumed_from": start, "losses": [round(x, 6) for x in history],
               "final_loss": float(np.mean(history[-10:])), "seconds": round(progress.elapsed, 1),
               "step_seconds": step_seconds, "fresh_share": share,
               "student_layers": config.num_hidden_layers, "student_parameters": model.parameter_count(),
               "student_config": asdict(config), "ranks": world.size, "compute_dtype": dtype,
               "weights_sha256_per_rank": world.gather(digest),
               "shards_per_rank": world.gather(sorted(s for g in mine for s in groups[g]))}
    return summary, config, model.numpy_weights()


CHECKPOINTS = "checkpoints"


def _checkpoint(output: Folder, model, optimizer, step: int, history: list[float], fingerprint: dict) -> None:
    """Weights, moments and step in one safetensors file, then `latest.json` naming it (the commit),
    then the earlier checkpoints deleted (202 MB each for the demo's student), those of other
    parameters included."""
    from safetensors.numpy import save as save_bytes

    arrays = {f"w/{n}": v.numpy() for n, v in model.weights.items()}
    arrays.update({f"m/{n}": m.numpy() for n, m in zip(optimizer.names, optimizer.m, strict=True)})
    arrays.update({f"v/{n}": v.numpy() for n, v in zip(optimizer.names, optimizer.v, strict=True)})
    name = f"{CHECKPOINTS}/ckpt-{step:07d}.safetensors"
    output.write_bytes(name, save_bytes(arrays, metadata={"step": str(step), "history": json.dumps(history)}))
    latest = {"step": step, "file": name, "params": fingerprint}
    output.write_bytes(f"{CHECKPOINTS}/latest.json", json.dumps(latest, sort_keys=True).encode())
    for older in output.list(f"{CHECKPOINTS}/"):  # never read again: a rerun resumes from latest.json's
        if older != name and older.rsplit("/", 1)[-1].startswith("ckpt-"):
            output.delete(older)


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
