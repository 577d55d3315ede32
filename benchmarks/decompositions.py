"""Time the OPCM projection per decomposition and thread count on ViT-B/32 shapes.

.venv/bin/python benchmarks/decompositions.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

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
        for shape in [(768, 768), (3072, 768), (768, 3072)]:
            m, x = torch.randn(shape) * 0.01, torch.randn(shape) * 0.01
            row = {
                d: round(median_ms(lambda d=d, x=x, m=m: project(x, m, 0.5, d)), 1)
                for d in ("svd32", "auto", "svd64")
            }
            print(threads, shape, row, flush=True)


if __name__ == "__main__":
    main()
