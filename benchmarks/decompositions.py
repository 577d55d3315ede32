"""Time the OPCM projection per decomposition and thread count on ViT-B/32 shapes.

    .venv/bin/python benchmarks/decompositions.py

Run it with ``PYTHONPATH=<an older checkout>`` (from outside this folder) to time another
version of ``mergeflow.merging.linalg`` the same way. The last line times what a fold does:
two worker threads of one torch thread each (numpy's BLAS on one thread too), projecting
8 matrices of 768x768 and 4 of 3072x768 (a sixth of ViT-B/32's 72). The line after it times
one worker of two torch threads on the same matrices (``MERGEFLOW_FOLD_WORKERS=1``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from threadpoolctl import threadpool_limits

from mergeflow.merging.linalg import project


def median_ms(f: Callable[[], object], n: int = 5) -> float:
    """Median wall time of ``n`` calls, in milliseconds."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main() -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with threadpool_limits(1, user_api="blas"):
            for shape in [(768, 768), (3072, 768), (768, 3072)]:
                m, x = torch.randn(shape) * 0.01, torch.randn(shape) * 0.01
                row = {
                    d: round(median_ms(lambda d=d, x=x, m=m: project(x, m, 0.5, d)), 1)
                    for d in ("svd32", "auto", "svd64")
                }
                print(threads, shape, row, flush=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = [(768, 768)] * 8 + [(3072, 768)] * 4
    mats = [(torch.randn(s) * 0.01, torch.randn(s) * 0.01) for s in shapes]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(2) as pool:
        ms = median_ms(lambda: list(pool.map(lambda mx: project(mx[1], mx[0], 0.5), mats)), 3)
    print(f"2 workers x 1 thread, 8 x 768x768 + 4 x 3072x768 (auto): {ms:.0f} ms", flush=True)
    torch.set_num_threads(2)  # one worker of two threads (MERGEFLOW_FOLD_WORKERS=1)
    with threadpool_limits(1, user_api="blas"):
        ms = median_ms(lambda: [project(x, m, 0.5) for m, x in mats], 3)
    print(f"1 worker x 2 threads, the same 12 (auto): {ms:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
