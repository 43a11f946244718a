"""The embedded default: a step is a child process of the Airflow task.

The process's output goes line by line into the task log, which stamps each line: so a line
loses the step's own leading timestamp, and a progress bar that still drew (its redraws joined
by carriage returns; step_env turns the known ones off) keeps only its last state. Exit code 2
is the steps' "bad input" (a StepError: the same input fails the same way), so the task fails
without retries; any other non-zero exit may be transient and is left to the task's retries.
Killing the task kills the whole process group, Horovod ranks included.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from bertdistill import children
from bertdistill.errors import BAD_INPUT_EXIT

# The timestamp a line of the step starts with: its logging format's asctime ("2026-11-26 13:34:19,407 ")
# or TensorFlow's C++ logging's ("2026-11-26 13:34:19.407123: I tensorflow/..."), after the rank
# horovodrun puts first ("[1]<stderr>:") for a multi-rank distill.
STEP_TIMESTAMP = re.compile(r"\A(\[\d+\]<\w+>:)?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?:? ")


def relayed(line: str) -> str:
    """A line of the step's output as the task log gets it: one timestamp (Airflow's), one redraw."""
    return STEP_TIMESTAMP.sub(r"\1", line.rstrip("\r\n").rsplit("\r", 1)[-1], count=1)


def step_command(arguments: Sequence[str], ranks: int = 1) -> list[str]:
    """`bertdistill ARGS`, or `horovodrun -np N` on localhost around it for a multi-rank distill."""
    exe = shutil.which("bertdistill", path=os.path.dirname(sys.executable)) or shutil.which("bertdistill")
    command = [exe] if exe else [sys.executable, "-m", "bertdistill.cli"]
    if ranks > 1:
        horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or "horovodrun"
        command = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
    return [*command, *arguments]


class LocalStepOperator(BaseOperator):
    """Runs `bertdistill <arguments>` (XCom-fed, mappable) as a child process."""

    template_fields: Sequence[str] = ("arguments", "env_vars", "ranks")
    ui_color = "#e8f4e8"

    def __init__(self, *, arguments: list[str], env_vars: dict[str, str] | None = None, ranks: int | str = 1,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.arguments = arguments
        self.env_vars = env_vars or {}
        self.ranks = ranks
        self._proc: subprocess.Popen | None = None

    def execute(self, context: Any) -> None:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        command = step_command([str(a) for a in self.arguments], int(self.ranks))
        self.log.info("running: %s", " ".join(command))
        env = {**os.environ, **{k: str(v) for k, v in self.env_vars.items()}, "PYTHONUNBUFFERED": "1"}
        # Its own group, so on_kill ends the step and all it started; and dying with this task process
        # (children.py), which on_kill cannot cover when the task itself is SIGKILLed.
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True, preexec_fn=children.preexec_fn())
        last_error = ""
        assert self._proc.stdout is not None
        # lines end at "\n" only, so a progress bar's "\r" redraws stay one line (text=True would split them)
        for raw in io.TextIOWrapper(self._proc.stdout, encoding="utf-8", errors="replace", newline="\n"):
            line = relayed(raw)
            if "error:" in line:
                last_error = line
            self.log.info("%s", line)
        code = self._proc.wait()
        if code == BAD_INPUT_EXIT:
            raise AirflowFailException(f"{self.arguments[0]} refused its input (exit 2): {last_error}")
        if code != 0:
            raise AirflowException(f"{self.arguments[0]} failed with exit code {code}: {last_error or 'see the log'}")

    def on_kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
