"""Run a command (`airflow dags test ...`), keep its whole output in a log file, and show a
person the run's progress: each task as it starts and ends with elapsed time, the steps' own
progress lines (at most one per task every PROGRESS_EVERY seconds) and a heartbeat when
nothing else was shown for HEARTBEAT seconds.

    python -m bertdistill.orchestration.demo_progress --log data/demo.log -- airflow dags test ...

Why: `make demo` runs for about a quarter of an hour; a silent terminal looks like a hang.
Exits with the command's status; on failure prints the log's last lines and where it is.
"""

from __future__ import annotations

import argparse
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

PROGRESS_EVERY = 20.0
HEARTBEAT = 50.0
POLL = 5.0  # seconds between heartbeat checks while the command is silent
START = re.compile(r"\[DAG TEST\] starting task_id=(\w+) map_index=(-?\d+)")
END = re.compile(r"\[DAG TEST\] end task task_id=(\w+) map_index=(-?\d+)")
STATE = re.compile(r"Task instance state updated .*new_state=(\w+)")
# A step's own lines, as LocalStepOperator relays them (Airflow's timestamp only):
# "<ts> [info     ] INFO bertdistill.<module>: <message> [airflow...]"
STEP_LOG = re.compile(r"INFO bertdistill\.[\w.]+: (.*?)\s*\[airflow\.task\.operators")
# A step's one-line result (printed to stdout by the CLI) and failures
# check_dump's reason to stop the run: the dump was already distilled (what the run's note in Airflow says)
NOTHING_TO_DO = re.compile(r"\] (\S+ \d{8} was already distilled and published .*?)\s*\[bertdistill\.orchestration")
STEP_RESULT = re.compile(r"\[info\s*\] ([a-z-]+: .*?->.*?)\s*\[airflow\.task\.operators")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:d}:{secs:02d}"


def _task(task_id: str, map_index: str) -> str:
    return task_id if map_index == "-1" else f"{task_id}[{map_index}]"


@dataclass
class ProgressView:
    """Turns the DAG test's log lines into a few lines a person reads; `show` prints one."""

    show: Callable[[str], None]
    now: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    task: str | None = None
    task_started: float = 0.0
    state: str = ""
    last_shown: float = 0.0
    last_progress: float = -1e9
    nothing_to_do: str = ""

    def __post_init__(self) -> None:
        self.started = self.last_shown = self.now()

    def _emit(self, text: str) -> None:
        self.last_shown = self.now()
        self.show(f"[{_clock(self.last_shown - self.started)}] {text}")

    def line(self, text: str) -> None:
        if m := START.search(text):
            self.task, self.task_started, self.state = _task(*m.groups()), self.now(), ""
            self._emit(f"start {self.task}")
        elif m := END.search(text):
            seconds = self.now() - self.task_started
            self._emit(f"{self.state or 'ended'} {_task(*m.groups())} in {_clock(seconds)}")
            self.task = None
        elif m := STATE.search(text):
            if m.group(1) != "running":
                self.state = m.group(1)
        elif m := NOTHING_TO_DO.search(text):
            self.nothing_to_do = m.group(1)
        elif m := STEP_RESULT.search(text):
            self._emit(f"  {m.group(1)}")
        elif (m := STEP_LOG.search(text)) and self.now() - self.last_progress >= PROGRESS_EVERY:
            self.last_progress = self.now()
            self._emit(f"  {m.group(1)}")

    def tick(self) -> None:
        """Called when no line came for a while: a heartbeat if the terminal was quiet too long."""
        if self.now() - self.last_shown >= HEARTBEAT:
            what = f"{self.task} running for {_clock(self.now() - self.task_started)}" if self.task else "working"
            self._emit(f"  ... {what}")


def _pump(stream: TextIO, lines: queue.Queue) -> None:
    for text in stream:
        lines.put(text)
    lines.put(None)


def run(command: list[str], log: Path, show: Callable[[str], None] = print) -> int:
    view = ProgressView(show)
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: queue.Queue = queue.Queue()
    with log.open("w") as out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, bufsize=1) as process:
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        while True:
            try:
                text = lines.get(timeout=POLL)
            except queue.Empty:
                view.tick()
                continue
            if text is None:
                break
            out.write(text)
            out.flush()
            view.line(text)
            view.tick()
        code = process.wait()
    if code:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        show("\n".join(tail))
        show(f"the DAG run failed (exit {code}); full log in {log}")
    elif view.nothing_to_do:
        show(f"[{_clock(view.now() - view.started)}] nothing to do: {view.nothing_to_do}")
    else:
        show(f"[{_clock(view.now() - view.started)}] DAG run finished; full log in {log}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="file that receives the command's whole output")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return run(command, args.log, lambda text: print(text, flush=True))


if __name__ == "__main__":
    sys.exit(main())
