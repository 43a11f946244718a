"""`make demo`'s terminal view: tasks with elapsed time, the steps' progress, a heartbeat, the
whole log in a file and the command's exit status kept."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bertdistill.orchestration import demo_progress

# Lines in the shape `airflow dags test` writes them (taken from a real demo log, paths shortened; a step's
# own lines with the one timestamp LocalStepOperator leaves them).
LINES = [
    "2026-11-26T13:33:47.644653Z [info     ] [DAG TEST] starting task_id=adapt_teacher map_index=-1 "
    "[airflow.sdk.definitions.dag] loc=dag.py:1501",
    "2026-11-26T13:34:19.407590Z [info     ] INFO bertdistill.steps.adapt_teacher: "
    "adapt-teacher: 1 steps (0.3%), 0.2 steps/s [airflow.task.operators.bertdistill.orchestration.local."
    "LocalStepOperator]",
    "2026-11-26T13:34:25.201437Z [info     ] INFO bertdistill.steps.adapt_teacher: "
    "adapt-teacher: 6 steps (2.0%), 0.5 steps/s [airflow.task.operators.bertdistill.orchestration.local."
    "LocalStepOperator]",
    "2026-11-26T13:40:08.931644Z [info     ] adapt-teacher: 300 steps (heads + encoder), held-out masked-LM "
    "top-1 24.4% (before: 0.0%) in 355 s -> data/teachers/minilm-adapted [airflow.task.operators.bertdistill."
    "orchestration.local.LocalStepOperator]",
    "2026-11-26T13:40:12.370592Z [info     ] Task instance state updated    [airflow.api_fastapi.execution_api."
    "routes.task_instances] correlation_id=01a2 loc=task_instances.py:485 new_state=success",
    "2026-11-26T13:40:12.386796Z [info     ] [DAG TEST] end task task_id=adapt_teacher map_index=-1 "
    "[airflow.sdk.definitions.dag] loc=dag.py:1563",
    "2026-11-26T13:40:12.504794Z [info     ] [DAG TEST] starting task_id=label_teacher map_index=3 "
    "[airflow.sdk.definitions.dag] loc=dag.py:1501",
]


def _script(tmp_path: Path, pause: float, code: int) -> list[str]:
    script = tmp_path / "fake_dag_test.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        lines = {LINES!r}
        for line in lines[:-1]:
            print(line, flush=True)
        print(lines[-1], flush=True)
        time.sleep({pause})
        print("noise that only the log keeps", flush=True)
        sys.exit({code})
    """))
    return [sys.executable, str(script)]


def test_tasks_progress_and_heartbeat_shown_and_the_whole_output_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_progress, "HEARTBEAT", 1.0)
    monkeypatch.setattr(demo_progress, "POLL", 0.2)
    shown: list[str] = []
    log = tmp_path / "logs" / "demo.log"
    assert demo_progress.run(_script(tmp_path, 2.5, 0), log, shown.append) == 0
    text = "\n".join(shown)
    assert "start adapt_teacher" in text
    assert "adapt-teacher: 1 steps (0.3%)" in text
    assert "6 steps (2.0%)" not in text, "progress lines are throttled to one per PROGRESS_EVERY seconds"
    assert "held-out masked-LM top-1 24.4%" in text, "a step's result line is always shown"
    assert "success adapt_teacher in 0:00" in text
    assert "start label_teacher[3]" in text
    assert "... label_teacher[3] running for 0:0" in text, "a heartbeat names the running task"
    assert "noise that only the log keeps" not in text
    logged = log.read_text()
    assert all(line in logged for line in LINES) and "noise that only the log keeps" in logged


def test_a_step_line_is_shown_as_the_local_operator_relays_it():
    """The progress view reads the step's lines after LocalStepOperator dropped their own timestamp."""
    pytest.importorskip("airflow")
    from bertdistill.orchestration.local import relayed

    step = relayed("2026-11-26 13:34:19,407 INFO bertdistill.steps.distill: distill: 50 steps (25.0%)\n")
    shown: list[str] = []
    demo_progress.ProgressView(shown.append).line(
        f"2026-11-26T13:34:19.407590Z [info     ] {step} [airflow.task.operators.bertdistill.orchestration."
        "local.LocalStepOperator]")
    assert shown == ["[0:00]   distill: 50 steps (25.0%)"]


def test_a_failed_run_keeps_its_exit_status_and_shows_the_log_tail(tmp_path):
    shown: list[str] = []
    log = tmp_path / "demo.log"
    assert demo_progress.run(_script(tmp_path, 0, 3), log, shown.append) == 3
    assert "noise that only the log keeps" in shown[-2]
    assert shown[-1] == f"the DAG run failed (exit 3); full log in {log}"



def test_a_second_demo_says_in_one_line_that_there_was_nothing_to_do(tmp_path):
    """check_dump's line, as `airflow dags test` logs it, becomes the run's last line: what the run's note
    in Airflow's grid says, not a "DAG run finished" that hides that nothing ran."""
    script = tmp_path / "noop.py"
    script.write_text(
        "print('2026-12-04T21:35:12.304443Z [info     ] enwiki 20160101 was already distilled and published with "
        "these settings, as bertdistill-enwiki-minilm-3l-64 version 1; set force to distil it again "
        "[bertdistill.orchestration.tasks] loc=tasks.py:70', flush=True)\n")
    shown: list[str] = []
    assert demo_progress.run([sys.executable, str(script)], tmp_path / "demo.log", shown.append) == 0
    assert shown == ["[0:00] nothing to do: enwiki 20160101 was already distilled and published with these settings, "
                     "as bertdistill-enwiki-minilm-3l-64 version 1; set force to distil it again"]
