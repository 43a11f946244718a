"""A step as a Kubernetes pod: the provider's KubernetesPodOperator, plus the steps' exit codes.

The pod operator raises the same AirflowException for every failed pod, so every failure would
be retried. A step's exit code 2 means its input was refused (errors.py): the same pod would
fail the same way, so that task fails at once, with the step's own error line, and no retry.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

from bertdistill.errors import BAD_INPUT_EXIT


def exit_code(pod: Any, container: str) -> int | None:
    """The exit code of a pod's terminated container, or None while it has none."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


class StepPodOperator(KubernetesPodOperator):
    """`bertdistill <arguments>` in a pod; a step that refused its input fails its task without retries."""

    def cleanup(self, pod, remote_pod, xcom_result=None, context=None) -> None:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        try:
            super().cleanup(pod, remote_pod, xcom_result, context)
        except AirflowException as exc:
            if exit_code(remote_pod, self.base_container_name) != BAD_INPUT_EXIT:
                raise
            raise AirflowFailException(f"{self.arguments[0] if self.arguments else 'the step'} refused its input "
                                       f"(exit {BAD_INPUT_EXIT}; not retried): {exc}") from exc
