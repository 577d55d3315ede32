"""Overlap reading and math: one reader thread prefetches tensors while workers fold them.

Every pass of the engine is per tensor: read a few input tensors by name, compute, write
the result. :func:`run` streams such a pass through three stages:

* **read**: one thread calls ``load(key)`` in key order, so a reader keeps one file (or
  shard) open and reads sequentially;
* **compute**: ``workers`` threads call ``compute(key, loaded)``; on a CPU each runs its
  torch ops single-threaded (``torch.set_num_threads(1)`` while any such pass runs: the
  setting is the process's, so overlapping passes share one save and restore; numpy's LAPACK,
  used for OPCM's ``eigh``, always runs on one thread: its two-thread ``eigh`` was slower,
  also with one worker), which keeps two
  independent decompositions busy on two cores and keeps results bit-identical from run to
  run (the number of threads inside one op would change rounding);
* **consume**: the calling thread receives results in key order (``consume(key, result)``),
  so the writer sees the same order and the sums add up in the same order every time.

Memory stays bounded: at most ``window`` tensors are read ahead, and together no more
elements than :data:`MAX_INFLIGHT_ELEMENTS` or twice the largest tensor, whichever is more.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

L = TypeVar("L")
R = TypeVar("R")

MAX_INFLIGHT_ELEMENTS = 16 * 2**20
"""Elements read ahead at most (or twice the largest tensor): 64 MiB per float32 input."""


def default_workers(device: torch.device) -> int:
    """Compute threads: one per core this process may run on, at most 2, on a CPU
    (``MERGEFLOW_FOLD_WORKERS`` overrides), one on a GPU."""
    env = os.environ.get("MERGEFLOW_FOLD_WORKERS")
    if env:
        return max(1, int(env))
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(2, cores or 1))


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextmanager
def _single_threaded_ops(active: bool) -> Iterator[None]:
    """torch ops on one thread while any pass that asks for it runs (the setting is the
    process's): the first such pass saves the thread count, the last one restores it, so
    concurrent passes (mapped candidate folds) cannot leave the process on one thread."""
    global _threads_users, _threads_saved
    if not active:
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def run(
    keys: Iterable[str],
    load: Callable[[str], L],
    compute: Callable[[str, L], R],
    consume: Callable[[str, R], None],
    *,
    sizes: Mapping[str, int],
    workers: int = 1,
) -> None:
    """Read, compute and consume every key (see the module doc); the first error is raised."""
    order = list(keys)
    if not order:
        return
    limit = max(MAX_INFLIGHT_ELEMENTS, 2 * max(sizes.get(k, 0) for k in order))
    window = 2 * workers + 2
    with (
        _single_threaded_ops(workers > 1),
        threadpool_limits(1, user_api="blas"),  # numpy's eigh: one thread was the fastest
        ThreadPoolExecutor(1, thread_name_prefix="mergeflow-read") as reader,
        ThreadPoolExecutor(workers, thread_name_prefix="mergeflow-fold") as pool,
    ):
        inflight: deque[tuple[str, Future[R]]] = deque()
        held = 0
        it = iter(order)
        nxt: str | None = next(it, None)

        def submit(key: str) -> Future[R]:
            loaded = reader.submit(load, key)
            return pool.submit(lambda: compute(key, loaded.result()))

        try:
            while nxt is not None or inflight:
                while nxt is not None and len(inflight) < window:
                    size = sizes.get(nxt, 0)
                    if inflight and held + size > limit:
                        break
                    inflight.append((nxt, submit(nxt)))
                    held += size
                    nxt = next(it, None)
                key, fut = inflight.popleft()
                held -= sizes.get(key, 0)
                consume(key, fut.result())
        finally:
            for _, fut in inflight:
                fut.cancel()
