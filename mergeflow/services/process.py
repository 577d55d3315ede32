"""Detached server processes recorded on disk, so that another process can stop them.

Each process runs in its own session and process group (``start_new_session``), with
stdout and stderr in a log file. A JSON record under the run directory holds its pid,
process group, start time (to survive pid reuse), ports and URLs. Stopping sends
SIGTERM to the whole group, waits, then SIGKILLs what is left. Linux (``/proc``) is
used to tell live processes from zombies; elsewhere ``kill(pid, 0)`` is the fallback.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.pids import pid_alive, reap, start_ticks


class StackError(MergeflowError):
    """A local service could not be started, reached or stopped."""


class ProcessRecord(BaseModel):
    """What `down` and `status` need to find a detached process again."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int
    pgid: int
    start_ticks: int | None
    argv: list[str]
    log: str
    url: str | None = None
    health_url: str | None = None
    health_max_status: int = 399
    port: int | None = None
    started_at: float


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def is_running(record: ProcessRecord) -> bool:
    """The recorded leader is alive, or other members of its group still are."""
    if pid_alive(record.pid, record.start_ticks):
        return True
    # The leader may have exited while children (e.g. uvicorn workers) live on.
    return record.start_ticks is not None and bool(group_members(record.pgid))


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, max_status: int = 399, timeout: float = 3.0) -> bool:
    """GET `url` answers with a status <= `max_status`."""
    request = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status <= max_status
    except urllib.error.HTTPError as err:
        return err.code <= max_status
    except (OSError, ValueError):
        return False


def healthy(record: ProcessRecord) -> bool:
    """Running and, when it has a health URL, answering it."""
    if not is_running(record):
        return False
    if record.health_url is None:
        return True
    return http_ok(record.health_url, record.health_max_status)


def log_tail(path: str | Path, lines: int = 40) -> str:
    """Last `lines` lines of a log file, or a note that it is missing."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    run_dir: Path,
    cwd: Path | None = None,
    url: str | None = None,
    health_url: str | None = None,
    health_max_status: int = 399,
    port: int | None = None,
) -> ProcessRecord:
    """Start `argv` detached in its own process group and record it as `name`.

    The log goes to ``run_dir/<name>.log`` (appended, so a restart keeps history).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log"
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start {name}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as err:
            raise StackError(f"cannot start {name} ({argv[0]}): {err}") from err
    record = ProcessRecord(
        name=name,
        pid=proc.pid,
        pgid=proc.pid,
        start_ticks=start_ticks(proc.pid),
        argv=list(argv),
        log=str(log_path),
        url=url,
        health_url=health_url,
        health_max_status=health_max_status,
        port=port,
        started_at=time.time(),
    )
    path = record_path(run_dir, name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    tmp.replace(path)
    return record


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    path = record_path(run_dir, name)
    try:
        return ProcessRecord.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def read_records(run_dir: Path) -> list[ProcessRecord]:
    """All recorded processes, oldest first."""
    if not run_dir.is_dir():
        return []
    records = [read_record(run_dir, p.stem) for p in run_dir.glob("*.json")]
    return sorted((r for r in records if r is not None), key=lambda r: r.started_at)


def wait_healthy(
    record: ProcessRecord,
    timeout: float,
    *,
    check: Callable[[], bool] | None = None,
    interval: float = 0.5,
) -> None:
    """Block until the process answers its health check; raise StackError with the log tail.

    `check` replaces the HTTP health URL when given. Fails fast when the process dies.
    """
    deadline = time.monotonic() + timeout
    probe = check or (
        lambda: record.health_url is None or http_ok(record.health_url, record.health_max_status)
    )
    while True:
        if not is_running(record):
            raise StackError(
                f"{record.name} exited during start-up; last lines of {record.log}:\n"
                f"{log_tail(record.log)}"
            )
        if probe():
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{record.name} did not become healthy within {timeout:.0f}s "
                f"({record.health_url or 'custom check'}); last lines of {record.log}:\n"
                f"{log_tail(record.log)}"
            )
        time.sleep(interval)


def stop(record: ProcessRecord, run_dir: Path, timeout: float = 20.0) -> bool:
    """SIGTERM the process group, wait up to `timeout`, then SIGKILL; forget the record.

    Returns True if something was running. Idempotent.
    """
    was_running = is_running(record)
    if was_running:
        _signal_group(record, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and is_running(record):
            time.sleep(0.2)
        if is_running(record):
            _signal_group(record, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and is_running(record):
                time.sleep(0.1)
        if is_running(record):
            raise StackError(f"cannot stop {record.name} (pid {record.pid}, group {record.pgid})")
    record_path(run_dir, record.name).unlink(missing_ok=True)
    return was_running


def _signal_group(record: ProcessRecord, sig: signal.Signals) -> None:
    # Only signal the group if it is still ours: the leader matches, or the group has
    # members and the leader's pid has not been reused by another process.
    leader_ok = pid_alive(record.pid, record.start_ticks)
    if not leader_ok and pid_alive(record.pid):
        # The pid was reused by an unrelated process; signal the surviving members only.
        for pid in group_members(record.pgid):
            if pid != record.pid:
                _kill(pid, sig)
        return
    try:
        os.killpg(record.pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as err:
        raise StackError(f"no permission to stop {record.name} (group {record.pgid})") from err
    reap(record.pid)


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def port_free(host: str, port: int) -> bool:
    """Nothing listens on host:port and we could bind it (TIME_WAIT is fine, as for Go servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ephemeral_floor() -> int:
    """The lowest port the kernel hands out as the local end of a connection (Linux; else 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(
    n: int = 1, start: int = 20000, stop: int | None = None, host: str = "127.0.0.1"
) -> int:
    """First port ``p`` such that ``p .. p+n-1`` are all free on ``host`` (randomised start).

    ``stop`` defaults to the ephemeral range's floor: a port above it that is free when
    checked can become a client connection's local end before the server binds it.
    """
    stop = stop if stop is not None else max(ephemeral_floor(), start + 10 * n)
    base = random.randrange(start, stop - n, n)
    for p in list(range(base, stop - n, n)) + list(range(start, base, n)):
        if all(port_free(host, p + i) for i in range(n)):
            return p
    raise ConfigError(f"no block of {n} free ports on {host}")
