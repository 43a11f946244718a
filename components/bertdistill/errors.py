"""The one exception type a step raises for bad input or a bad environment.

The CLI turns it into a single `error: ...` line and a non-zero exit, so its message must
say what was wrong, where (file, URI or flag) and what to do about it; anything else that
escapes a step is a bug and keeps its traceback.
"""


class StepError(Exception):
    """Bad input, parameters or environment, explained for the person who ran the step."""
