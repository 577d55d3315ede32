"""The engine's read-ahead pipeline (``mergeflow/merging/pipeline.py``): order, errors, threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from mergeflow.merging import pipeline


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch on two threads for the test (the setting is the process's), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pass(keys: list[str], compute: Callable[[str, str], str], out: list[str]) -> None:
    pipeline.run(
        keys,
        lambda k: k,
        compute,
        lambda k, r: out.append(r),
        sizes=dict.fromkeys(keys, 1),
        workers=2,
    )


def test_results_are_consumed_in_key_order_and_the_first_error_is_raised() -> None:
    keys = [f"k{i}" for i in range(20)]
    out: list[str] = []
    _pass(keys, lambda k, loaded: loaded.upper(), out)
    assert out == [k.upper() for k in keys]

    def fail(k: str, loaded: str) -> str:
        if k == "k5":
            raise ValueError("k5 is bad")
        return loaded

    out.clear()
    with pytest.raises(ValueError, match="k5 is bad"):
        _pass(keys, fail, out)
    assert out == keys[:5]


def test_overlapping_passes_restore_the_thread_count(two_threads: None) -> None:
    """Pass A starts, then B; A ends while B still runs, then B ends. Saving and restoring
    per pass (the old code) left the process on one thread: B saved A's setting."""
    a_started, b_started, a_done = threading.Event(), threading.Event(), threading.Event()
    seen_in_b: list[int] = []

    def compute_a(k: str, loaded: str) -> str:
        a_started.set()
        assert b_started.wait(10)
        return loaded

    def compute_b(k: str, loaded: str) -> str:
        b_started.set()
        assert a_done.wait(10)
        seen_in_b.append(torch.get_num_threads())
        return loaded

    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            _pass(["a"], compute_a, [])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            a_done.set()

    ta = threading.Thread(target=run_a)
    ta.start()
    assert a_started.wait(10)
    _pass(["b"], compute_b, [])
    ta.join(10)
    assert not errors
    assert seen_in_b == [1], "B's ops ran on more than one thread after A ended"
    assert torch.get_num_threads() == 2


def test_cpu_workers_follow_the_cores_this_process_may_use(monkeypatch) -> None:
    """One compute thread per core of the process's CPU set (a container's or taskset's), at
    most 2; ``MERGEFLOW_FOLD_WORKERS`` overrides; one on a GPU."""
    import os

    default_workers = pipeline.default_workers
    monkeypatch.delenv("MERGEFLOW_FOLD_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert default_workers(torch.device("cpu")) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_workers(torch.device("cpu")) == 2
    assert default_workers(torch.device("cuda")) == 1
    monkeypatch.setenv("MERGEFLOW_FOLD_WORKERS", "3")
    assert default_workers(torch.device("cpu")) == 3
