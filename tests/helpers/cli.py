"""Running the ``mergeflow`` CLI from tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
