"""`bertdistill <step> [--flags]`: the only entry point a container runs.

Each subcommand's flags are its step's params dataclass (flags.py: one field, one flag, its
default and help stated there), and the subcommand calls the step's run() with them. A
StepError becomes one `error:` line and its exit code: 2 for bad input (retrying cannot
help), 1 for a TransientError (errors.py); anything else is a bug and keeps its traceback
(exit 1, retried like a transient fault).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import typing
from types import ModuleType

from bertdistill import __version__, flags, tracking
from bertdistill.errors import StepError
from bertdistill.steps import (
    adapt_teacher,
    build_corpus,
    distill,
    evaluate,
    extract,
    fetch_dump,
    fetch_teacher,
    label_teacher,
    make_examples,
    publish,
)
from bertdistill.store import scratch_dir

# The steps, in pipeline order. Each names itself in its docstring's first line
# ("fetch-dump: what it does") and takes the params dataclass its run() declares.
STEPS: list[ModuleType] = [fetch_dump, extract, build_corpus, make_examples, fetch_teacher, adapt_teacher,
                           label_teacher, distill, evaluate, publish]


def step_name(module: ModuleType) -> str:
    return module.__name__.rpartition(".")[2].replace("_", "-")


def params_class(module: ModuleType) -> type:
    return typing.get_type_hints(module.run)["params"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertdistill", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bertdistill {__version__}")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for module in STEPS:
        name, _, help_text = module.__doc__.splitlines()[0].partition(": ")
        if name != step_name(module):
            raise TypeError(f"{module.__name__}'s docstring must start with '{step_name(module)}: '")
        p = sub.add_parser(name, help=help_text, description=help_text)
        flags.add_flags(p, params_class(module), skip=("force",))
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
    try:  # before the step runs: TensorFlow's import (inside the step) needs a writable temp folder
        scratch_dir()
    except StepError as exc:
        print(f"error: {args.step}: {exc}", file=sys.stderr)
        return exc.exit_code
    module = next(m for m in STEPS if step_name(m) == args.step)
    params_cls = params_class(module)
    fields = params_cls.__dataclass_fields__
    params = params_cls(**{k: v for k, v in vars(args).items() if k in fields})
    output = getattr(params, "output", None)
    # A stop (SIGTERM) closes the step's MLflow run KILLED; one that comes while the run is being opened
    # waits until its id is known, so no stop leaves a run RUNNING.
    stop = _StopOnSigterm(deferred=True)
    signal.signal(signal.SIGTERM, stop)
    try:
        run_id = tracking.open_step(args.step, output)
    except Exception as exc:  # the step runs anyway; its run is made at the end, as a retry would
        print(f"warning: {args.step}: could not open its MLflow run: {exc}", file=sys.stderr)
        run_id = None
    try:
        stop.now()
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
        tracking.log_step(args.step, manifest, output, run_id, cpu_seconds=cpu_seconds())
    except Stopped:  # the work is committed; a rerun skips it and logs again
        _close_quietly(args.step, run_id, "KILLED", "stopped while logging its results")
        raise
    except Exception as exc:  # the work is committed; a rerun (a retry) skips it and logs again
        _close_quietly(args.step, run_id, "FAILED", f"logging failed: {exc}")
        print(f"error: {args.step}: finished, but logging to MLflow failed: {tracking.registry_error(exc, 'logging')}",
              file=sys.stderr)
        return 1
    return 0


def cpu_seconds() -> float:
    """CPU seconds this step process has used, its reaped children (pool workers, WikiExtractor) included:
    what the step cost, whether it did the work or found it done (then only its start-up)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Stopped(SystemExit):
    """SIGTERM: Airflow killing the task, Kubernetes deleting the pod."""


class _StopOnSigterm:
    """SIGTERM's handler: raises Stopped, or while `deferred` remembers the signal until `now()`."""

    def __init__(self, deferred: bool = False):
        self.deferred, self.pending = deferred, 0

    def __call__(self, signum: int, frame: object) -> None:
        if self.deferred:
            self.pending = signum
        else:
            raise Stopped(128 + signum)

    def now(self) -> None:
        """Stop deferring: a SIGTERM that came meanwhile raises here."""
        self.deferred = False
        if self.pending:
            raise Stopped(128 + self.pending)


def _close_quietly(step: str, run_id: str | None, status: str, error: str) -> None:
    try:
        tracking.close_step(run_id, status, error)
    except Exception as exc:  # the step's own exit code says more than the tracking failure
        print(f"warning: {step}: its MLflow run could not be closed: {exc}", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
