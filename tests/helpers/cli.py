"""Running the ``mergeflow`` CLI from tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mergeflow ARGS`` in a subprocess and capture its output (slow: a new
    interpreter imports torch; prefer the in-process ``cli`` fixture)."""
    return subprocess.run(
        [sys.executable, "-m", "mergeflow", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


class Result:
    """What an in-process CLI call returned and printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def start_serve(
    stack: Any,
    name: str,
    lineages: Sequence[Any],
    *args: str,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Start ``mergeflow serve --poll 1 --lineage …`` as the stack's process ``name`` and wait
    until its fold triggers exist (an event emitted earlier would start no run); its log."""
    from mergeflow.flows.deployments import wait_until_served
    from mergeflow.services.process import log_tail

    argv = [sys.executable, "-m", "mergeflow", "serve", "--poll", "1", *args]
    for spec in lineages:
        argv += ["--lineage", spec.name]
    status = stack.start_process(stack.command(name, argv, env=env))
    log = Path(status.log or "")
    try:
        wait_until_served(lineages)
    except Exception as e:
        stack.stop_process(name)
        raise AssertionError(f"{e}\n{log_tail(log, 40)}") from e
    return log
