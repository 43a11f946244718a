"""`bertdistill <step> [--flags]`: the only entry point a container runs.

Each subcommand maps its flags onto the step's params dataclass and calls the step's
run(). A StepError becomes one `error:` line and its exit code: 2 for bad input (retrying
cannot help), 1 for a TransientError (errors.py); anything else is a bug and keeps its
traceback (exit 1, retried like a transient fault).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from bertdistill import __version__, tracking
from bertdistill.errors import StepError
from bertdistill.steps.fetch_dump import DEFAULT_MIRROR
from bertdistill.steps.fetch_teacher import GOOGLE_BERT_BASE_UNCASED
from bertdistill.store import scratch_dir


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fetch_dump(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wiki", required=True, help="wiki database name, e.g. enwiki")
    p.add_argument("--date", default="latest", help="dump date YYYYMMDD, or 'latest' (newest finished dump)")
    p.add_argument("--output", required=True,
                   help="dumps root URI; files land in <output>/<wiki>/<date>/")
    p.add_argument("--mirror", default=DEFAULT_MIRROR,
                   help="dump server base URL, local folder or file:// URL laid out like dumps.wikimedia.org")
    p.add_argument("--max-files", type=_positive, default=None,
                   help="fetch only the first N pages-articles files (default: all)")


def _extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="dump file URI (.xml, .xml.bz2)")
    p.add_argument("--output", required=True, help="articles folder URI (part-NNNNN.jsonl.gz)")
    p.add_argument("--processes", type=int, default=0, help="WikiExtractor processes (0: one per core)")


def _build_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, nargs="+",
                   help="articles folder URI(s) (extract's outputs, one per dump file): read these and only these")
    p.add_argument("--output", required=True, help="text folder URI; writes train/ and heldout/ shards")
    p.add_argument("--train-shards", type=_positive, default=8, help="number of train shards")
    p.add_argument("--heldout-shards", type=int, default=1, help="number of held-out shards (0 allowed)")
    p.add_argument("--language", default="en", help="language code for the sentence splitter")


def _make_examples(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="text shard URI (one sentence per line, blank line between docs)")
    p.add_argument("--output", required=True, help="TFRecord URI to write")
    p.add_argument("--vocab-file", required=True, help="WordPiece vocab.txt URI")
    p.add_argument("--max-seq-length", type=int, default=128, help="maximum sequence length (L)")
    p.add_argument("--max-predictions-per-seq", type=int, default=20, help="maximum masked positions (P)")
    p.add_argument("--masked-lm-prob", type=float, default=0.15, help="share of tokens to mask")
    p.add_argument("--dupe-factor", type=int, default=10, help="passes over the input with different masks")
    p.add_argument("--short-seq-prob", type=float, default=0.1, help="probability of a shorter target length")
    p.add_argument("--random-seed", type=int, default=12345, help="seed; the output depends only on it and the input")
    p.add_argument("--do-whole-word-mask", action="store_true", help="mask whole words, not single pieces")
    p.add_argument("--no-lower-case", dest="do_lower_case", action="store_false",
                   help="keep case (for cased vocabs)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")


def _fetch_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=GOOGLE_BERT_BASE_UNCASED,
                   help="Google BERT zip (URL or path), or a Hugging Face folder with config.json, "
                   "model.safetensors and vocab.txt")
    p.add_argument("--output", required=True, help="teacher folder URI, e.g. data/teachers/bert-base-uncased")


def _adapt_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder URI (from fetch-teacher)")
    p.add_argument("--examples", required=True, help="examples folder URI with train/ and heldout/ shards")
    p.add_argument("--output", required=True, help="adapted teacher folder URI")
    p.add_argument("--freeze-encoder", action="store_true", help="fit the heads only; keep the encoder fixed")
    p.add_argument("--steps", type=_positive, default=300, help="training steps")
    p.add_argument("--batch-size", type=_positive, default=32, help="examples per step")
    p.add_argument("--learning-rate", type=float, default=4e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--eval-examples", type=_positive, default=2048, help="held-out examples to evaluate on")
    p.add_argument("--seed", type=int, default=0, help="seed for head initialisation and shuffling")


def _label_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder URI (with a masked-LM head)")
    p.add_argument("--input", required=True, help="example shard URI (from make-examples)")
    p.add_argument("--output", required=True, help="labelled shard URI to write")
    p.add_argument("--top-k", type=_positive, default=10, help="probabilities kept per masked position")
    p.add_argument("--batch-size", type=_positive, default=64, help="examples per inference batch")
    p.add_argument("--max-examples", type=int, default=0,
                   help="label only the first N examples of the shard (0: all): the DAG passes what distill "
                   "will consume, so the teacher never labels examples nobody trains on")


def _distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder URI (the one that made the labels)")
    p.add_argument("--labels", required=True, help="labels folder URI with train/ labelled shards")
    p.add_argument("--output", required=True, help="student folder URI: checkpoints/ and export/")
    p.add_argument("--student-layers", type=_positive, default=3, help="student layers (teacher's config otherwise)")
    p.add_argument("--student-hidden", type=_positive, default=None, help="student hidden size (default: teacher's)")
    p.add_argument("--student-config", default=None, help="explicit student config.json (overrides the two above)")
    p.add_argument("--student-init", default="teacher", choices=("teacher", "random"),
                   help="start from evenly spaced teacher layers (DistilBERT) or random weights")
    p.add_argument("--top-k", type=_positive, default=10, help="k the labels must have been made with")
    p.add_argument("--steps", type=_positive, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive, default=32, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=_positive, default=1,
                   help="micro-batches per optimizer step over all ranks (a multiple of the rank count); "
                   "global batch = batch-size x grad-accum at any scale")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    p.add_argument("--soft-mlm-weight", type=float, default=1.0, help="weight of T^2 KL on the cached top-k")
    p.add_argument("--hard-mlm-weight", type=float, default=1.0, help="weight of cross-entropy on masked_lm_ids")
    p.add_argument("--nsp-weight", type=float, default=0.5, help="weight of next-sentence loss on the labels")
    p.add_argument("--soft-nsp-weight", type=float, default=0.5, help="weight of KL on the teacher's NSP logits "
                   "(both soft weights 0: the no-teacher control, hard labels only)")
    p.add_argument("--checkpoint-every", type=_positive, default=100, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed: data order, dropout masks, random init")
    p.add_argument("--lr-scaling", default="none", choices=("none", "linear"),
                   help="linear: multiply the learning rate by grad-accum, the global batch over batch-size "
                   "(the same at any rank count)")
    p.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads per process (0: default)")


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder URI (the one that made the labels)")
    p.add_argument("--student", required=True, help="student folder URI (distill's output, with export/)")
    p.add_argument("--heldout", required=True, help="folder URI of the held-out labelled shards")
    p.add_argument("--output", required=True, help="report folder URI (report.json, report.png)")
    p.add_argument("--control", default=None,
                   help="the no-teacher control's student folder URI (distill with --soft-mlm-weight 0 "
                   "--soft-nsp-weight 0, same init, data and steps): the report adds the distillation gain")
    p.add_argument("--champion", default=None, metavar="MODEL_NAME",
                   help="registered model whose current champion is scored on the same held-out examples when "
                   "its vocab and sequence length match (publish then decides on those figures)")
    p.add_argument("--top-k", type=_positive, default=10, help="k the labels must have been made with")
    p.add_argument("--batch-size", type=_positive, default=64, help="examples per evaluation batch")
    p.add_argument("--max-examples", type=int, default=50_000,
                   help="evaluate on the first N held-out examples (0: all); the default bounds evaluate's time "
                   "at any dump size (50,000 examples: about 1 M masked positions at 128 tokens)")
    p.add_argument("--latency-batch", type=_positive, default=32, help="batch size of the latency measurement")


def _publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="student folder URI (distill's output); writes savedmodel/ there")
    p.add_argument("--report", required=True, help="evaluate's output folder URI for this student")
    p.add_argument("--model-name", default="bertdistill-student", help="registered model name in MLflow")


# name -> (module under bertdistill.steps, params class, flag definer, help)
STEPS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], str]] = {
    "fetch-dump": ("fetch_dump", "FetchDumpParams", _fetch_dump,
                   "download a dump's pages-articles files, resumable, sha1-verified"),
    "extract": ("extract", "ExtractParams", _extract, "dump file -> articles JSONL.gz (WikiExtractor)"),
    "build-corpus": ("build_corpus", "BuildCorpusParams", _build_corpus,
                     "articles -> sentence-per-line train/held-out text shards"),
    "make-examples": ("make_examples", "MakeExamplesParams", _make_examples,
                      "text shard -> masked-LM + next-sentence TFRecords"),
    "fetch-teacher": ("fetch_teacher", "FetchTeacherParams", _fetch_teacher,
                      "Google BERT zip or Hugging Face folder -> verified teacher folder"),
    "adapt-teacher": ("adapt_teacher", "AdaptTeacherParams", _adapt_teacher,
                      "fit the masked-LM / next-sentence heads a sentence encoder lacks"),
    "label-teacher": ("label_teacher", "LabelTeacherParams", _label_teacher,
                      "example shard -> the same examples + the teacher's top-k and NSP outputs"),
    "distill": ("distill", "DistillParams", _distill, "train a student on the cached teacher labels"),
    "evaluate": ("evaluate", "EvaluateParams", _evaluate, "student vs teacher on the held-out labelled shards"),
    "publish": ("publish", "PublishParams", _publish,
                "student -> SavedModel, registered in MLflow; alias 'champion' moves only if better"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertdistill", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bertdistill {__version__}")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (_, _, define, help_text) in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        define(p)
        p.add_argument("--force", action="store_true", help="rerun even if the output's manifest says it is done")
        p.add_argument("--s3-endpoint-url", default=None,
                       help="S3-compatible endpoint (else BERTDISTILL_S3_ENDPOINT_URL or the AWS config)")
        p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.s3_endpoint_url:
        os.environ["BERTDISTILL_S3_ENDPOINT_URL"] = args.s3_endpoint_url
    try:  # before any step module is imported: TensorFlow's import itself needs a writable temp folder
        scratch_dir()
    except StepError as exc:
        print(f"error: {args.step}: {exc}", file=sys.stderr)
        return exc.exit_code
    module_name, params_name, _, _ = STEPS[args.step]
    module = importlib.import_module(f"bertdistill.steps.{module_name}")
    params_cls = getattr(module, params_name)
    fields = params_cls.__dataclass_fields__
    params = params_cls(**{k: v for k, v in vars(args).items() if k in fields})
    output = getattr(params, "output", None)
    try:
        run_id = tracking.open_step(args.step, output)
    except Exception as exc:  # the step runs anyway; its run is made at the end, as a retry would
        print(f"warning: {args.step}: could not open its MLflow run: {exc}", file=sys.stderr)
        run_id = None
    signal.signal(signal.SIGTERM, _stop)
    try:
        manifest = module.run(params)
    except StepError as exc:
        print(f"error: {args.step}: {exc}", file=sys.stderr)
        _close_quietly(args.step, run_id, "FAILED", str(exc))
        return exc.exit_code
    except BaseException as exc:
        _close_quietly(args.step, run_id, "KILLED" if isinstance(exc, Stopped | KeyboardInterrupt) else "FAILED",
                       f"{type(exc).__name__}: {exc}")
        raise
    if manifest is None:  # a Horovod rank other than 0: rank 0 logs
        return 0
    try:
        tracking.log_step(args.step, manifest, output, run_id)
    except Exception as exc:  # the work is committed; a rerun (a retry) skips it and logs again
        _close_quietly(args.step, run_id, "FAILED", f"logging failed: {exc}")
        print(f"error: {args.step}: finished, but logging to MLflow failed: {tracking.registry_error(exc, 'logging')}",
              file=sys.stderr)
        return 1
    return 0


class Stopped(SystemExit):
    """SIGTERM: Airflow killing the task, Kubernetes deleting the pod."""


def _stop(signum, frame) -> None:
    raise Stopped(128 + signum)


def _close_quietly(step: str, run_id: str | None, status: str, error: str) -> None:
    try:
        tracking.close_step(run_id, status, error)
    except Exception as exc:  # the step's own exit code says more than the tracking failure
        print(f"warning: {step}: its MLflow run could not be closed: {exc}", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
