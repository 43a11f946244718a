"""publish: the student in the formats its users load, registered in MLflow; `champion` moves only if better.

Users need neither this package nor its weight format, so the student leaves in three forms,
under <student>/published/:
- huggingface/: a `transformers` folder (config, safetensors under Hugging Face's names with both
  heads, tokenizer files) with its model card (model_card.py), for fine-tuning;
- onnx/: evaluate's ONNX exports, fp32 and int8, for ONNX Runtime;
- savedmodel/: a SavedModel with one signature, `serving_default`: input_ids, input_mask,
  segment_ids (int32 [batch, seq]) -> mlm_logits [batch, seq, vocab], nsp_logits [batch, 2],
  pooled_output [batch, hidden], reloaded and checked against the student before anything is
  written; in MLflow as the `model` of this step's run.
What gets registered under --model-name is `fill_mask` (serving.py: text with [MASK] in, top
words out, through ONNX Runtime: int8 when evaluate found it within half a point of fp32, else
fp32), holding the Hugging Face folder and both ONNX files as artifacts, so the champion can be
served over HTTP by `mlflow models serve` as it is. The registry's alias `champion` moves to the
new version only when its held-out masked-LM accuracy (from evaluate's report, which must be
about this student) beats the current champion's; a tie keeps the incumbent. The decision and
the move happen under a lock in the registry (promotion_lock), so runs publishing at once
are judged one after the other.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bertdistill.errors import StepError, TransientError
from bertdistill.flags import flag
from bertdistill.manifest import Manifest, OutputWriter, committed_input, run_step
from bertdistill.onnx_model import FOLDER as ONNX
from bertdistill.store import open_folder, scratch_dir
from bertdistill.teachers import committed_export, staged_teacher

log = logging.getLogger(__name__)

CHAMPION = "champion"
ACCURACY_TAG = "heldout_mlm_accuracy"
PUBLISHED, SAVEDMODEL, HUGGINGFACE = "published", "savedmodel", "huggingface"
LOCK_SUFFIX = "-promotion-lock"
LOCK_STALE_S = 900.0


@dataclass
class PublishParams:
    student: str = flag(help="student folder URI (distill's output); writes published/ there")
    report: str = flag(help="evaluate's output folder URI for this student")
    model_name: str = flag("bertdistill-student", help="registered model name in MLflow")
    force: bool = False

    @property
    def output(self) -> str:
        return open_folder(self.student).child_uri(PUBLISHED)


def run(params: PublishParams) -> Manifest:
    output = open_folder(params.output)
    report = _report_about(params)
    export_uri = committed_export(params.student)
    fingerprint = {"model_name": params.model_name, "schema": 2}

    def work(writer: OutputWriter) -> dict:
        with staged_teacher(export_uri) as local, tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
            from bertdistill.bert.checkpoints import load_teacher
            from bertdistill.bert.hf_folder import write_hf_folder
            from bertdistill.model_card import render

            config, weights, vocab = load_teacher(local, export_uri)
            staged = Path(tmp)
            module = export_savedmodel(config, weights, staged / SAVEDMODEL)
            card = render(report, params.model_name, pipeline_params(), report["latency_batch"])
            write_hf_folder(staged / HUGGINGFACE, config, weights, vocab, card, report["max_seq_length"])
            stage_onnx(params.report, staged / ONNX)
            for path in sorted(p for p in staged.rglob("*") if p.is_file()):
                writer.write_bytes(path.relative_to(staged).as_posix(), path.read_bytes())
            summary = register(module, config, report, params, staged, vocab)
        # the pipeline's run links the version it registered
        summary["parent_tags"] = {"model_version": f"models:/{params.model_name}/{summary['model_version']}",
                                  "champion": str(summary["champion"]).lower()}
        verdict = ("is the new champion" if summary["champion"] else "did not beat the champion") + (
            f" (compared on {summary['champion_basis']})")
        print(f"publish: {params.model_name} version {summary['model_version']} (held-out masked-LM accuracy "
              f"{summary[ACCURACY_TAG]:.1%}) {verdict}; Hugging Face folder, ONNX and SavedModel in {output.uri}")
        return summary

    return run_step("publish", fingerprint, {"student": export_uri, "report": params.report}, output, work,
                    force=params.force)


def decide(accuracy: float, report: dict, current) -> tuple[bool, float, str]:
    """(is the new student the champion?, the champion's accuracy it was compared with, on what basis).

    The same held-out examples when evaluate scored the current champion on them; else the
    accuracy recorded when the champion was published (another run's held-out examples).
    A tie keeps the incumbent.
    """
    if current is None:
        return True, float("-inf"), "no champion yet"
    scored = report.get("champion", {})
    if scored.get("version") == int(current.version):
        best = float(scored["mlm_accuracy"])
        return accuracy > best, best, "the same held-out examples"
    best = float(current.tags.get(ACCURACY_TAG, "-inf"))
    return accuracy > best, best, "the champion's recorded accuracy, on its own run's held-out examples"


def promote(client, model_name: str, version: str, accuracy: float, report: dict):
    """Move `champion` to `version` if it beats the current one: read, decide and set under the lock,
    so two runs publishing at once cannot both judge against the same incumbent and the last to
    write win. Returns (moved?, the incumbent version or None, its accuracy, the basis)."""
    from mlflow.exceptions import MlflowException

    with promotion_lock(client, model_name):
        try:
            current = client.get_model_version_by_alias(model_name, CHAMPION)
        except MlflowException:
            current = None
        champion, best, basis = decide(accuracy, report, current)
        if champion:
            client.set_registered_model_alias(model_name, CHAMPION, version)
    return champion, current, best, basis


@contextmanager
def promotion_lock(client, model_name: str, wait_s: float = 600, stale_s: float = LOCK_STALE_S):
    """A mutex in the registry itself: the registered model `<name>-promotion-lock` exists while a
    publisher holds it. MLflow has no compare-and-set for aliases, but creating a registered model
    is atomic (a name is unique in its database), and every publisher reaches the same registry
    wherever it runs (a pod, `make demo`, the CLI). A lock older than `stale_s` was left by a
    publisher that died between create and delete, and is removed by the next one."""
    from mlflow.exceptions import MlflowException

    name = f"{model_name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(name, description=(
                f"Held while a run decides whether to move {model_name}@{CHAMPION}; removed when it is done. "
                f"Left over for more than {stale_s / 60:.0f} minutes, it is removed by the next publish."))
            break
        except MlflowException as exc:
            # Taken; or taken and released at once (MLflow looks the clashing name up after its failed
            # insert, and finds it gone): both mean try again.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = client.get_registered_model(name)
        except MlflowException:
            continue  # released between our create and this read
        age_s = time.time() - held.creation_timestamp / 1000
        if age_s > stale_s:
            log.warning("removing %s, left %.0f s ago by a publisher that did not finish", name, age_s)
            client.delete_registered_model(name)
        elif time.monotonic() > deadline:
            raise TransientError(f"{name} has been held for {age_s:.0f} s by another publish of {model_name}; "
                                 f"retry, or delete that registered model if no publish is running")
        else:
            time.sleep(1)
    try:
        yield
    finally:
        client.delete_registered_model(name)


def describe(report: dict, client, parent: str | None) -> str:
    """A registry version's description: where it came from and how good it is, in one paragraph."""
    s, t = report["student"], report["teacher"]
    text = (f"{s['layers']}-layer student ({s['parameters'] / 1e6:.1f} M parameters): held-out masked-LM top-1 "
            f"{s['mlm_accuracy']:.1%}, teacher {t['mlm_accuracy']:.1%}")
    if "control" in report:
        gain = report["distillation_gain"]
        text += (f", no-teacher control {report['control']['mlm_accuracy']:.1%} (gain {gain['mlm_accuracy'] * 100:+.2f}"
                 f" points, 95% interval {gain['ci95_low'] * 100:+.2f} to {gain['ci95_high'] * 100:+.2f})")
    text += f"; encoder {report['speedup_encoder']:.2f}x faster than the teacher."
    if parent:
        run = client.get_run(parent)
        p, tags = run.data.params, run.data.tags
        text += (f" Dump {p.get('wiki')} {p.get('date')}; Airflow run {tags.get('airflow.run_id', '?')} "
                 f"(MLflow run {run.info.run_name}); {p.get('train_steps')} steps x {p.get('batch_size')} "
                 f"on {p.get('ranks')} rank(s), top-{p.get('top_k')} labels, {p.get('max_seq_length')} tokens, "
                 f"dupe {p.get('dupe_factor')}.")
    return text


def pipeline_params() -> dict[str, str]:
    """The pipeline run's parameters (dump, sizes, steps), for the model card; empty when untracked."""
    from bertdistill import tracking

    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    if not (parent and tracking.enabled()):
        return {}
    run = tracking.client().get_run(parent)
    params = dict(run.data.params)
    if params.get("teacher") in (None, "", "None", "null"):  # the deployment's teacher, which the run tags
        params["teacher"] = run.data.tags.get("bertdistill.teacher", "?")
    return params


def stage_onnx(report_uri: str, folder: Path) -> None:
    """evaluate's ONNX exports, copied from the report folder into `folder`."""
    import shutil

    from bertdistill.onnx_model import FP32, INT8

    source = open_folder(report_uri).join(ONNX)
    folder.mkdir(parents=True)
    for name in (FP32, INT8):
        if not source.exists(name):
            raise StepError(f"{report_uri} has no {ONNX}/{name}: evaluate this student again (evaluate writes its "
                            "ONNX exports since schema 4)")
        with source.local_copy(name) as path:
            shutil.copyfile(path, folder / name)


def artifact_tags(onnx: dict, published: Path) -> dict[str, str]:
    """What a registry version's files are and how they measured, readable in the registry's table."""
    hf_bytes = sum(p.stat().st_size for p in (published / HUGGINGFACE).iterdir())
    return {"huggingface_bytes": str(hf_bytes), "onnx_fp32_bytes": str(onnx["fp32"]["bytes"]),
            "onnx_int8_bytes": str(onnx["int8"]["bytes"]),
            "onnx_fp32_max_abs_logit_diff": f"{onnx['fp32']['max_abs_logit_diff_vs_tensorflow']:.2e}",
            "onnx_fp32_mlm_accuracy": repr(onnx["fp32"]["mlm_accuracy"]),
            "onnx_int8_mlm_accuracy": repr(onnx["int8"]["mlm_accuracy"]),
            "onnx_int8_minus_fp32_points": f"{onnx['int8_minus_fp32_points']:+.3f}",
            "serving": f"onnx {onnx['serves']}"}


def _report_about(params: PublishParams) -> dict:
    """evaluate's report, refused unless it evaluated this very student."""
    folder = open_folder(params.report)
    if not folder.exists("report.json"):
        raise StepError(f"{params.report} holds no evaluate report: run evaluate on the student first")
    manifest = committed_input(params.report, "evaluate")
    evaluated = manifest.inputs.get("student", "").partition(" ")[0]
    if evaluated.rstrip("/") != params.student.rstrip("/"):
        raise StepError(f"the report in {params.report} evaluated {evaluated}, not {params.student}: "
                        "evaluate this student and publish with its report")
    return json.loads(folder.read_bytes("report.json"))


def serving_module(config, weights):
    """A tf.Module whose `serve` function is the serving signature."""
    import tensorflow as tf

    from bertdistill.bert.model import Bert

    class Serving(tf.Module):
        def __init__(self):
            super().__init__(name="bertdistill_student")
            self.bert = Bert(config, weights=weights)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name=n)
                                      for n in ("input_ids", "input_mask", "segment_ids")])
        def serve(self, input_ids, input_mask, segment_ids):
            sequence = self.bert.encode(input_ids, input_mask, segment_ids)
            positions = tf.tile(tf.range(tf.shape(input_ids)[1])[None], [tf.shape(input_ids)[0], 1])
            return {"mlm_logits": self.bert.mlm_logits(sequence, positions),
                    "nsp_logits": self.bert.nsp_logits(sequence),
                    "pooled_output": self.bert.pooled(sequence)}

    return Serving()


def export_savedmodel(config, weights, path: Path):
    """Save, reload and compare on a probe batch: a SavedModel that does not reproduce its model is refused."""
    import numpy as np
    import tensorflow as tf

    module = serving_module(config, weights)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    rng = np.random.default_rng(0)
    probe = {"input_ids": tf.constant(rng.integers(0, config.vocab_size, (2, 16)), tf.int32),
             "input_mask": tf.ones([2, 16], tf.int32), "segment_ids": tf.zeros([2, 16], tf.int32)}
    expected = module.serve(**probe)
    reloaded = tf.saved_model.load(str(path)).signatures["serving_default"](**probe)
    for key, value in expected.items():
        diff = float(tf.reduce_max(tf.abs(value - reloaded[key])))
        if diff > 1e-4:
            raise StepError(f"the exported SavedModel's {key} differs from the student's by {diff}; not published")
    return module


def register(module, config, report: dict, params: PublishParams, published: Path, vocab) -> dict:
    """Log the SavedModel (TensorFlow flavour, token ids in) and the fill-mask model (text in, with the
    Hugging Face folder and the ONNX files) to an MLflow run, register the fill-mask one, tag the
    version with what its files are and how they measured, move `champion` if it is better."""
    import mlflow
    import mlflow.tensorflow
    import numpy as np
    import tensorflow as tf
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from bertdistill import tracking
    from bertdistill.serving import log_fill_mask

    accuracy = float(report["student"]["mlm_accuracy"])
    inputs = Schema([TensorSpec(np.dtype(np.int32), (-1, -1), n) for n in ("input_ids", "input_mask",
                                                                           "segment_ids")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, config.vocab_size), "mlm_logits"),
                      TensorSpec(np.dtype(np.float32), (-1, 2), "nsp_logits"),
                      TensorSpec(np.dtype(np.float32), (-1, config.hidden_size), "pooled_output")])
    client = tracking.client()
    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    tags = {"bertdistill.step": "publish", "bertdistill.output": params.output}
    if parent:
        tags["mlflow.parentRunId"] = parent
    try:
        run_id = tracking.step_run_id()  # the run the step opened as it started, else one of its own
        if run_id is None:
            experiment = client.get_run(parent).info.experiment_id if parent else tracking.experiment_id()
            run_id = client.create_run(experiment, run_name="publish", tags=tags).info.run_id
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metric(ACCURACY_TAG, accuracy)
            mlflow.log_dict(report, "report.json")
            mlflow.tensorflow.log_model(
                module, name="model", signature=ModelSignature(inputs, outputs),
                saved_model_kwargs={"signatures": {"serving_default": module.serve}},
                pip_requirements=[f"tensorflow-cpu=={tf.__version__}"])
            info = log_fill_mask(published, vocab.path, params.model_name, report["onnx"])
        version = str(info.registered_model_version)
        # what evaluate needs to score this version against a later student on the same examples
        version_tags = {ACCURACY_TAG: repr(accuracy), "vocab_sha256": vocab.sha256,
                        "bertdistill.export": open_folder(params.student).child_uri("export"),
                        "bertdistill.published": params.output, "bertdistill.report": params.report,
                        **artifact_tags(report["onnx"], published)}
        if "max_seq_length" in report:
            version_tags["max_seq_length"] = str(report["max_seq_length"])
        run = pipeline_params()
        if run.get("date"):  # the registry lists the months side by side: which dump each version learnt
            version_tags["dump"] = f"{run.get('wiki', '?')} {run['date']}"
        for key, value in version_tags.items():
            client.set_model_version_tag(params.model_name, version, key, value)
        client.update_model_version(params.model_name, version, description=describe(report, client, parent))
        champion, current, best, basis = promote(client, params.model_name, version, accuracy, report)
    except MlflowException as exc:
        raise tracking.registry_error(exc, f"registering {params.model_name}") from exc
    return {"model_name": params.model_name, "model_version": int(version), "mlflow_run_id": run_id,
            ACCURACY_TAG: accuracy, "champion": champion,
            "previous_champion_version": int(current.version) if current else None,
            "previous_champion_accuracy": None if current is None else best, "champion_basis": basis}
