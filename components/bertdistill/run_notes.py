"""The pipeline's MLflow parent run described for a person: the markdown MLflow shows as its note.

MLflow renders the tag `mlflow.note.content` as the run's description (links clickable), where a
tag such as airflow.url is plain text. tracking.py writes it when the run opens (what it is) and
again when it closes (how it ended); this module only composes the text.
"""

from __future__ import annotations

from typing import Any

# MLflow shows this tag as a run's description, rendered as markdown (links clickable), where a tag
# such as airflow.url is plain text: the parent run says there what it is and how it ended.
NOTE_TAG = "mlflow.note.content"
NOTE_MAX_CHARS = 8000  # MLflow's limit on a tag's value
OUTCOME_HEADING = "**Status:"
DEPLOYMENT_TEACHER = "the deployment's teacher (BERTDISTILL_TEACHER)"  # a form that names none


def pipeline_description(params: dict[str, Any], tags: dict[str, str]) -> str:
    """The parent run's description as it starts (markdown): the Airflow run it belongs to, as a
    link when `airflow.url` names it, and what it distils into what, on which dump."""
    lines = []
    if tags.get("airflow.run_id"):
        dag, run_type = tags.get("airflow.dag_id", "?"), tags.get("airflow.run_type")
        run = _markdown_link(tags["airflow.run_id"], tags.get("airflow.url", ""))
        lines.append(f"Airflow DAG `{dag}`, run {run}" + (f" ({run_type})." if run_type else "."))
    teacher = tags.get("bertdistill.teacher") or params.get("teacher")
    student = f"a {params['student_layers']}-layer student" if params.get("student_layers") else "a student"
    what = f"Distils {f'`{teacher}`' if teacher else DEPLOYMENT_TEACHER} into {student}"
    if params.get("wiki"):
        what += f" on the {params['wiki']} dump" + (f" of {params['date']}" if params.get("date") else "")
    training = []
    if params.get("train_steps"):
        steps = params["train_steps"]
        training.append(f"{steps:,} steps" if isinstance(steps, int) else f"{steps} steps")
        if params.get("batch_size"):
            training[-1] += f" of {params['batch_size']} examples"
    if params.get("ranks"):
        training.append(f"{params['ranks']} rank(s)")
    if params.get("top_k"):
        training.append(f"top-{params['top_k']} teacher labels")
    if "control" in params:
        training.append("with a no-teacher control" if params["control"] else "without a no-teacher control")
    lines.append(what + (f": {', '.join(training)}." if training else "."))
    if tags.get("bertdistill.student"):
        lines.append(f"Student folder: `{tags['bertdistill.student']}`.")
    return note("\n\n".join(lines))


def pipeline_outcome(status: str, wall_seconds: float, tags: dict[str, str], metrics: dict[str, float]) -> str:
    """What the description gains at the end (markdown): the status, evaluate's verdict and headline
    accuracies, and the version publish registered, as far as the run got."""
    head = f"{OUTCOME_HEADING} {status}** after {wall_seconds:,.0f} s"
    if tags.get("bertdistill.failed_tasks"):
        head += f"; failed tasks: {tags['bertdistill.failed_tasks']}"
    lines = [head + "."]
    if tags.get("bertdistill.verdict"):
        lines.append(tags["bertdistill.verdict"])
    else:
        lines.append("No verdict: evaluate did not report one.")
    figures = [f"{who} {metrics[f'{key}_mlm_accuracy']:.1%}"
               for key, who in (("student", "student"), ("control", "control"), ("teacher", "teacher"),
                                ("baseline", "most-frequent-token baseline"))
               if f"{key}_mlm_accuracy" in metrics]
    if figures:
        lines.append(f"Held-out masked-LM top-1: {', '.join(figures)}.")
    if tags.get("bertdistill.model_version"):
        crowned = {"true": " (the new champion)", "false": " (not the champion)"}.get(
            tags.get("bertdistill.champion", ""), "")
        lines.append(f"Registered `{tags['bertdistill.model_version']}`{crowned}.")
    return "\n\n".join(lines)


def _markdown_link(text: str, url: str) -> str:
    """`text` as a markdown link to `url` (an http(s) URL), else as code: brackets in the text and
    spaces or parentheses in the URL would end the link early."""
    if not url.startswith(("http://", "https://")):
        return f"`{text}`"
    text = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    url = url.replace(" ", "%20").replace("(", "%28").replace(")", "%29")
    return f"[{text}]({url})"


def note(text: str) -> str:
    """`text` cut to what MLflow keeps of a tag."""
    return text if len(text) <= NOTE_MAX_CHARS else text[: NOTE_MAX_CHARS - 3] + "..."
