"""Retry policy shared by every task: only transient infrastructure failures are retried."""

from __future__ import annotations

from typing import Any

from portcullis.errors import is_retryable


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient.

    A :class:`~portcullis.errors.PolicyRefusal` (a refusal, a missing database, a bad input)
    gives the same answer every time, so it is never retried; neither is anything this
    function cannot identify as an exception. The exception is read from the failed state
    itself, so deciding costs no result lookup.
    """
    error = state.data
    return isinstance(error, BaseException) and is_retryable(error)
