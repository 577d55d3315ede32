"""Where pipeline commands find the stack: the environment, else a running `mergeflow up`.

Only the standard library is imported at module level, so the light CLI loads it freely.
"""

from __future__ import annotations

import os
import sys

from mergeflow.errors import ConfigError


def use_stack_env() -> None:
    """Point Prefect/MLflow/S3 clients at the local stack when nothing else is configured."""
    if os.environ.get("PREFECT_API_URL"):
        return
    try:
        # pipeline extra: loaded on use, the light CLI runs without it
        from mergeflow.services.stack import Stack

        # pipeline extra: loaded on use, the light CLI runs without it
        from mergeflow.settings import Settings
    except ImportError as err:
        raise ConfigError(
            f"the pipeline needs the pipeline extra (pip install 'mergeflow[pipeline]'): {err}"
        ) from err
    stack = Stack(Settings())
    # Running processes, not a health probe: a probe can time out on a busy machine while
    # the servers run, and the clients retry their own calls.
    missing = stack.not_running()
    if missing:
        raise ConfigError(
            f"no Prefect server configured: set PREFECT_API_URL (and MLFLOW_TRACKING_URI, AWS_*) or start the local stack with `mergeflow up` (not running: {', '.join(missing)})"
        )
    os.environ.update(stack.env())
    if "prefect" in sys.modules:
        # pipeline extra: loaded on use, the light CLI runs without it
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
