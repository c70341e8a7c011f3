"""Retry policy shared by every task: only transient infrastructure failures are retried."""

from __future__ import annotations

from typing import Any

from portcullis.errors import is_retryable


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a TransientError, never a policy refusal."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_retryable(exc)
    return False
