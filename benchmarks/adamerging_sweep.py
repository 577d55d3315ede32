"""How adamerging's defaults were chosen: settings compared on the **validation** split only.

    .venv/bin/python benchmarks/adamerging_sweep.py --suite vision --orders 2

Folds the suite's checkpoints with ``adamerging`` under each setting in ``GRID`` over the
same seeded random orders as ``benchmarks/quality.py`` and prints the final normalized ACC
on validation (each task's score over its own checkpoint's validation score). Test scores
are neither computed nor printed: the reported quality stays a held-out measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import LEARNING, load

from mergeflow.architecture import resolve_projection
from mergeflow.evaluation import build_evaluator
from mergeflow.evaluation.calibration import build_objective
from mergeflow.merging.engine import fold, new_state
from mergeflow.merging.export import export
from mergeflow.merging.state import BaseRef
from mergeflow.merging.tensors import DictReader, DictWriter

HERE = Path(__file__).resolve().parent
GRID: list[dict] = [  # 0-10: the per-tensor sweep that set lr, steps and batch; 11-13: rows
    {"granularity": "tensor"},
    {"granularity": "tensor", "lr": 0.03},
    {"granularity": "tensor", "lr": 0.05, "steps": 120},
    {"granularity": "tensor", "steps": 200},
    {"granularity": "module"},
    {"granularity": "tensor", "batch_size": 64},
    {"granularity": "tensor", "lr": 0.1, "steps": 120},
    {"granularity": "tensor", "lr": 0.05, "steps": 200},
    {"granularity": "tensor", "lr": 0.05, "steps": 120, "batch_size": 64},
    {"granularity": "tensor", "update": "projected"},
    {"granularity": "tensor", "update": "projected", "alpha": 0.8},
    {},
    {"steps": 120},
    {"lr": 0.03},
]


def final_validation(ld, evaluator, params: dict, order: list[str]) -> float:
    """Normalized validation ACC after folding ``order`` with adamerging under ``params``."""
    es = ld.suite.evaluation_suite()
    br = DictReader(ld.base, "base")
    info = new_state(
        "adamerging", params, BaseRef(uri="b", digest="b"), resolve_projection(br, ld.config)
    )
    state = None
    for i, cid in enumerate(order):
        folded = order[: i + 1]
        objective = build_objective(
            es,
            ld.config,
            {c: ld.heads[c] for c in folded},
            folded,
            batch_size=int(params.get("batch_size", 32)),
            seed=int(params.get("seed", 0)),
        )
        w = DictWriter()
        info = fold(
            info, state, br, DictReader(ld.checkpoints[cid], cid),
            checkpoint_id=cid, digest=cid, out=w, objective=objective,
        )  # fmt: skip
        state = w.reader()
    mw = DictWriter()
    export(info, state, br, mw)
    scores = evaluator.evaluate(mw.reader(), ld.heads, es.tasks, "validation")
    own = {}
    for cid, name in ld.task_of.items():
        backbone = {k: v for k, v in ld.checkpoints[cid].items() if k in ld.base}
        t = es.task(name)
        own[name] = evaluator.evaluate(DictReader(backbone), ld.heads, [t], "validation")[name]
    return statistics.mean(scores[n] / own[n] for n in scores)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=["vision", "text"], default="vision")
    ap.add_argument("--orders", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=str, default="", help="comma-separated GRID indices to run")
    args = ap.parse_args(argv)
    assert "adamerging" in LEARNING
    if args.suite == "vision":
        from mergeflow.examples.digits import build_digits_suite

        suite = build_digits_suite(HERE / "_work" / "quality" / "digits", n_tasks=8, seed=args.seed)
    else:
        from mergeflow.examples.text import build_text_suite

        suite = build_text_suite(HERE / "_work" / "quality" / "text", seed=args.seed)
    ld = load(suite)
    evaluator = build_evaluator(suite.evaluation_suite(), model_config=ld.config)
    ids = list(suite.checkpoint_ids)
    rng = np.random.default_rng(args.seed)
    orders = [[ids[i] for i in rng.permutation(len(ids))] for _ in range(args.orders)]
    print(f"| setting | validation nACC (%), {args.orders} orders | s |\n|---|---|---|")
    chosen = [GRID[int(i)] for i in args.only.split(",")] if args.only else GRID
    for params in chosen:
        t0 = time.perf_counter()
        vals = [final_validation(ld, evaluator, params, o) for o in orders]
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        print(
            f"| {label} | {100 * statistics.mean(vals):.1f} | {time.perf_counter() - t0:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
