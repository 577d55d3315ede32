"""The IO retry policy of tasks: retry what the network or a service caused, never a user's error."""

from __future__ import annotations

from typing import Any

from mergeflow.errors import MergeflowError, ServiceUnavailable

IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10]}


def not_user_error(task: object, task_run: object, state: Any) -> bool:
    """Retry IO failures, never errors the user caused (bad checkpoint, bad config); a
    service that did not answer (:class:`ServiceUnavailable`) is retried."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return True
    return not isinstance(exc, MergeflowError) or isinstance(exc, ServiceUnavailable)


io_task: dict[str, Any] = {**IO_RETRIES, "retry_condition_fn": not_user_error}
"""Keyword arguments of ``@task`` for a task whose work is IO."""
