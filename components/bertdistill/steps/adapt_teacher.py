"""adapt-teacher: give a sentence encoder the heads a teacher needs, and check it can teach.

Sentence encoders such as MiniLM ship without a masked-LM head (and without a
next-sentence classifier). This step fits both on the train examples, by default while
fine-tuning the whole encoder briefly (`--freeze-encoder` trains the heads alone), then
measures held-out masked-LM top-1 accuracy, which the manifest keeps: a teacher whose
accuracy is unknown, or a randomly initialised one, never labels anything. Measured with
MiniLM on the sample's demo split on 2 cores: 19.3% held-out top-1 after 120 steps of
32 x 128 at the default peak learning rate 4e-4 (335 s); 24.4% after 300 steps of 32 x 64
at 1e-3 (416 s). A 3-layer student started from its layers and trained 200 steps without
it reaches as much, so a teacher is worth distilling only well beyond that.

The result is a new teacher folder; its manifest makes later runs reuse it instead of
adapting again. Its huggingface/ subfolder is the same teacher for `transformers`, so the labels
it made can be reproduced outside the platform.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bertdistill.errors import StepError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, run_step
from bertdistill.progress import Progress
from bertdistill.store import open_folder, scratch_dir
from bertdistill.teachers import committed_teacher, staged_teacher
from bertdistill.warmup import warmup_length

log = logging.getLogger(__name__)


@dataclass
class AdaptTeacherParams:
    teacher: str = flag(help="teacher folder URI (from fetch-teacher)")
    examples: str = flag(help="examples folder URI with train/ and heldout/ shards")
    output: str = flag(help="adapted teacher folder URI")
    freeze_encoder: bool = flag(False, help="fit the heads only; keep the encoder fixed")
    steps: int = flag(300, minimum=1, help="training steps")
    batch_size: int = flag(32, minimum=1, help="examples per step")
    learning_rate: float = flag(4e-4, help="peak learning rate (AdamW)")
    warmup_steps: int | None = flag(None, minimum=0, help="linear warm-up steps (default: --warmup-fraction of "
                                    "--steps)")
    warmup_fraction: float = flag(0.1, help="linear warm-up as a fraction of --steps, unless --warmup-steps is "
                                  "given: the learning rate rises to its peak, then decays linearly to 0")
    eval_examples: int = flag(2048, minimum=1, help="held-out examples to evaluate on")
    seed: int = flag(0, help="seed for head initialisation and shuffling")
    force: bool = False

    def warmup(self) -> int:
        """The warm-up length in steps (warmup.py: a fraction of --steps unless --warmup-steps is given)."""
        return warmup_length(self.steps, self.warmup_steps, self.warmup_fraction)


def _shards(examples: str, split: str) -> tuple[list[str], dict]:
    """The split's example shards, each refused unless make-examples committed it (examples_info)."""
    from bertdistill.shards import examples_info

    folder = open_folder(examples).join(split)
    names = [n for n in folder.list() if n.endswith(".tfrecord")]
    if not names:
        raise StepError(f"{folder.uri} holds no .tfrecord shards: run make-examples for the {split} split")
    infos = [examples_info(folder.child_uri(n)) for n in names]
    return [folder.child_uri(n) for n in names], infos[0]


def run(params: AdaptTeacherParams) -> Manifest:
    if params.steps < 1 or params.batch_size < 1:
        raise StepError("--steps and --batch-size must be at least 1")
    params.warmup()  # refuses a warm-up that leaves no step to decay in
    committed_teacher(params.teacher)
    train, info = _shards(params.examples, "train")
    heldout, _ = _shards(params.examples, "heldout")
    fingerprint = {k: v for k, v in params.__dict__.items()
                   if k not in ("teacher", "examples", "output", "force", "warmup_fraction")}
    fingerprint["warmup_steps"] = params.warmup()  # what shapes the teacher, however it was asked for
    fingerprint["schema"] = 3  # 3: with huggingface/

    def work(writer: OutputWriter) -> dict:
        from bertdistill.bert.checkpoints import load_teacher, save_teacher
        from bertdistill.bert.hf_folder import write_hf_folder
        from bertdistill.model_card import teacher_card

        with staged_teacher(params.teacher) as local:
            config, weights, vocab = load_teacher(local, params.teacher, required_heads=())
            vocab_path = local / "vocab.txt"
            if vocab.sha256 != info["vocab_sha256"]:
                raise StepError(f"{params.examples} was made with another vocab than teacher {params.teacher}: "
                                "remake the examples with the teacher's vocab.txt")
            with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
                staged = train + heldout  # streamed from the store by tfdata.records
                summary, adapted = _adapt(config, weights, staged[: len(train)], staged[len(train) :], info, params)
                out = Path(tmp) / "out"
                save_teacher(out, config, adapted, vocab_path)
                write_hf_folder(out / "huggingface", config, adapted, vocab,
                                teacher_card(params.teacher.rstrip("/").rsplit("/", 1)[-1], summary,
                                             info["max_seq_length"]), info["max_seq_length"])
                for path in sorted(p for p in out.rglob("*") if p.is_file()):
                    with writer.write(path.relative_to(out).as_posix()) as pending:
                        shutil.copyfile(path, pending.path)
        print(f"adapt-teacher: {params.steps} steps ({'heads only' if params.freeze_encoder else 'heads + encoder'}), "
              f"held-out masked-LM top-1 {summary['heldout_mlm_accuracy']:.1%} (before: "
              f"{summary['heldout_mlm_accuracy_before']:.1%}) in {summary['seconds']:.0f} s -> {params.output}")
        return summary

    return run_step("adapt-teacher", fingerprint, {"teacher": params.teacher, "examples": params.examples},
                    open_folder(params.output), work, force=params.force)


def evaluate_mlm(model, paths: list[str], info: dict, limit: int, batch_size: int = 64) -> float:
    """Held-out masked-LM top-1 accuracy over the real masked positions of the first `limit` examples."""
    import tensorflow as tf

    from bertdistill.tfdata import pretraining_dataset

    @tf.function
    def predict(b):
        sequence = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"])
        return tf.argmax(model.mlm_logits(sequence, b["masked_lm_positions"]), axis=-1, output_type=tf.int32)

    correct = total = seen = 0
    ds = pretraining_dataset(paths, info["max_seq_length"], info["max_predictions_per_seq"], batch_size)
    for batch in ds:
        if seen >= limit:
            break
        weights = batch["masked_lm_weights"].numpy() > 0
        hits = predict(batch).numpy() == batch["masked_lm_ids"].numpy()
        correct += int((hits & weights).sum())
        total += int(weights.sum())
        seen += len(weights)
    return correct / max(total, 1)


def _adapt(config, weights, train: list[str], heldout: list[str], info: dict, params: AdaptTeacherParams):
    import tensorflow as tf

    from bertdistill.bert.model import Bert
    from bertdistill.losses import masked_lm_loss, next_sentence_loss
    from bertdistill.optim import AdamW
    from bertdistill.tfdata import pretraining_dataset

    tf.random.set_seed(params.seed)
    model = Bert(config, seed=params.seed, weights=weights)  # heads the checkpoint lacks start fresh
    before = evaluate_mlm(model, heldout, info, params.eval_examples)
    trainable = {n: v for n, v in model.weights.items()
                 if not params.freeze_encoder or n.startswith(("cls/", "bert/pooler/"))}
    optimizer = AdamW(trainable, params.learning_rate, params.warmup(), params.steps)
    variables = list(trainable.values())

    @tf.function
    def train_step(b):
        with tf.GradientTape() as tape:
            sequence = model.encode(b["input_ids"], b["input_mask"], b["segment_ids"], training=True)
            mlm = masked_lm_loss(model.mlm_logits(sequence, b["masked_lm_positions"]), b["masked_lm_ids"],
                                 b["masked_lm_weights"])
            nsp = next_sentence_loss(model.nsp_logits(sequence), b["next_sentence_labels"][:, 0])
            loss = mlm + nsp
        lr, _ = optimizer.apply(tape.gradient(loss, variables))
        return loss, mlm, nsp, lr

    data = iter(pretraining_dataset(train, info["max_seq_length"], info["max_predictions_per_seq"],
                                    params.batch_size, shuffle=True, repeat=True, seed=params.seed))
    progress = Progress(log, "adapt-teacher", params.steps)
    losses = []
    for step in range(1, params.steps + 1):
        loss, mlm, nsp, lr = train_step(next(data))
        if not tf.math.is_finite(loss):
            raise StepError(f"adapt-teacher: the loss became {float(loss)} at step {step}; lower --learning-rate")
        losses.append(float(mlm))
        if step % 25 == 0 or step == params.steps:
            log.info("adapt-teacher: step %d/%d mlm loss %.3f nsp loss %.3f lr %.2e", step, params.steps,
                     float(mlm), float(nsp), float(lr))
        progress.update(step, " steps")
    accuracy = evaluate_mlm(model, heldout, info, params.eval_examples)
    summary = {"heldout_mlm_accuracy": accuracy, "heldout_mlm_accuracy_before": before,
               "final_mlm_loss": sum(losses[-10:]) / len(losses[-10:]), "steps": params.steps,
               "seconds": round(progress.elapsed, 1), "trained": "heads" if params.freeze_encoder else "all"}
    return summary, model.numpy_weights()
