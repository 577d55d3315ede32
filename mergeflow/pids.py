"""Process identity: whether a pid runs, and when it started (so a reused pid is told apart)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/<pid>/stat`` (state first), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; everything after the last ')' is well formed.
    return stat[stat.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux), or None if unknown."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (tests start in-process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs (a zombie, killed but not reaped yet, does not) and, when given,
    started at ``start`` (see :func:`start_ticks`)."""
    reap(pid)
    if Path("/proc").is_dir():
        fields = _stat_fields(pid)
        if not fields or fields[0] in ("Z", "X"):
            return False
        return start is None or start_ticks(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
