"""Kill points for crash tests: SIGKILL this process the moment it reaches a named point.

Loaded by Python at start-up when this folder is on ``PYTHONPATH`` (``sitecustomize``), so
it reaches every process of a run (``mergeflow serve``, its flow-run children, a CLI run)
without touching mergeflow's code. Inactive unless ``MERGEFLOW_KILL_AT`` names a point:

``MERGEFLOW_KILL_AT``      a key of :data:`POINTS`
``MERGEFLOW_KILL_ONCE``    a file path: the first process to reach the point creates it
                           (O_EXCL) and dies; every later one runs on (so the retry lives)
``MERGEFLOW_KILL_MATCH``   only kill inside a flow run whose name contains this text

A point is a function (``module``, ``Class.attr`` or ``task.fn``) reached for the N-th
time in this process, optionally only inside a Prefect task whose name starts with a
prefix, optionally only after another function returned. The function is wrapped right
after its module is imported (an import hook), so nothing else is slowed down.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import threading
from typing import Any

# point -> (module, attribute path, n-th call, task name prefix, "after" attribute path)
POINTS: dict[str, tuple[str, str, int, str, str]] = {
    # the first tensor read of a checkpoint (screening or folding)
    "read": ("mergeflow.storage.safetensors_file", "SafetensorsReader.get", 1, "", ""),
    # in the middle of the fold: the second state tensor written
    "fold": ("mergeflow.storage.shard_writer", "ShardedWriter.add", 2, "fold", ""),
    # the state's tensors are written; state.json (its commit) not yet
    "state": ("mergeflow.storage.states", "StateWrite.commit", 1, "fold", ""),
    # in the middle of the export: the second merged tensor written
    "export": ("mergeflow.storage.shard_writer", "ShardedWriter.add", 2, "export-model", ""),
    # the evaluation has started
    "evaluate": ("mergeflow.tasks.evaluate", "evaluate_model.fn", 1, "", ""),
    # everything is written; the MLflow version not yet
    "register": ("mergeflow.storage.registry.client", "Registry.register_fold", 1, "", ""),
    # the version exists; the aliases have not moved yet
    "aliases": (
        "mergeflow.storage.registry.client",
        "Registry._reconcile_aliases",
        1,
        "",
        "Registry._create_version",
    ),
}


def _in_scope(task_prefix: str, match: str) -> bool:
    if not (task_prefix or match):
        return True
    from prefect.context import FlowRunContext, TaskRunContext

    if task_prefix:
        ctx = TaskRunContext.get()
        if ctx is None or not ctx.task.name.startswith(task_prefix):
            return False
    if match:
        fctx = FlowRunContext.get()
        if fctx is None or fctx.flow_run is None or match not in fctx.flow_run.name:
            return False
    return True


def _die(point: str) -> None:
    once = os.environ.get("MERGEFLOW_KILL_ONCE", "")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{point} {os.getpid()}\n".encode())
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(module: Any, point: str) -> None:
    _, path, nth, task_prefix, after = POINTS[point]
    match = os.environ.get("MERGEFLOW_KILL_MATCH", "")
    state = {"calls": 0, "after_seen": not after}
    lock = threading.Lock()

    def resolve(dotted: str) -> tuple[Any, str]:
        owner = module
        *parents, attr = dotted.split(".")
        for p in parents:
            owner = getattr(owner, p)
        return owner, attr

    owner, attr = resolve(path)
    target = getattr(owner, attr)

    @functools.wraps(target)
    def killing(*args: Any, **kwargs: Any) -> Any:
        if state["after_seen"] and _in_scope(task_prefix, match):
            with lock:
                state["calls"] += 1
                hit = state["calls"] == nth
            if hit:
                _die(point)
        return target(*args, **kwargs)

    setattr(owner, attr, killing)
    if after:
        a_owner, a_attr = resolve(after)
        a_target = getattr(a_owner, a_attr)

        @functools.wraps(a_target)
        def marking(*args: Any, **kwargs: Any) -> Any:
            out = a_target(*args, **kwargs)
            state["after_seen"] = True
            return out

        setattr(a_owner, a_attr, marking)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps the point's function right after its module has been executed."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.module = POINTS[point][0]

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader, point = spec.loader, self.point
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _patch(module, point)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_POINT = os.environ.get("MERGEFLOW_KILL_AT", "")
if _POINT:
    if _POINT not in POINTS:
        raise SystemExit(f"MERGEFLOW_KILL_AT={_POINT!r}: not one of {sorted(POINTS)}")
    sys.meta_path.insert(0, _PatchOnImport(_POINT))
