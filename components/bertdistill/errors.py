"""The exceptions a step raises for what the person running it must know, and their exit codes.

The CLI turns either into a single `error: ...` line, so its message must say what was wrong,
where (file, URI or flag) and what to do about it; anything else that escapes a step is a bug
and keeps its traceback. The exit code tells the orchestrator whether trying again can help:
bad input fails the same way every time (exit 2, never retried); an infrastructure fault that
may pass (an S3 server's 5xx or throttling, a dropped connection, an unreachable tracking
server) exits 1 like a crash, and the task's retries take it.
"""

BAD_INPUT_EXIT = 2
TRANSIENT_EXIT = 1


class StepError(Exception):
    """Bad input, parameters or environment, explained for the person who ran the step."""

    exit_code = BAD_INPUT_EXIT


class TransientError(StepError):
    """A fault outside the step's input that a later try may not meet; explained like a StepError."""

    exit_code = TRANSIENT_EXIT
