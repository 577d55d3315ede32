"""FW-Merging's robustness claim on our vision suite: relevant checkpoints plus 0, 4, 8, 16 irrelevant ones.

"Scaling Model Merging with Frank-Wolfe Optimization" claims FW-Merging stays stable as
irrelevant models join the pool, where task arithmetic collapses. This script builds (or
reuses) the digits suite of ``benchmarks/quality.py`` and merges pools of

- the 4 **relevant** checkpoints (rot90, flip_lr, invert, parity), whose tasks have data;
- plus 0, 4, 8 or 16 **irrelevant** ones: first the 4 fine-tunes on the suite's other tasks
  (transpose, shift, blur, flip_ud: unrelated tasks), then damaged checkpoints, seeded:
  a relevant checkpoint's task vector negated, scaled by 3, or replaced by Gaussian noise
  of the same norm, cycling over the relevant checkpoints.

Methods, each on the same pools, scored on the relevant tasks' **test** split with their
own heads: ``fw_merging`` (FW-Hard with FusionBench's defaults; with the authors'
discriminative config's step size 1; and with that step size starting at the base),
``fw_soft`` (FW-Soft: one checkpoint per task, the step learned as AdaMerging
coefficients, 10 x 500 Adam steps; with the authors' entropy for the coefficients, and with
mergeflow's default, cross-entropy), ``batch_adamerging`` (learned
coefficients, one per checkpoint and tensor), batch task arithmetic (s = 0.3), batch TIES
(defaults) and continual ``opcm`` (pool folded relevant-first, in pool order). The learning
methods read only the relevant tasks' **calibration** split (64 training images each).

    .venv/bin/python benchmarks/fw_pool.py                 # 0, 4, 8, 16 irrelevant
    .venv/bin/python benchmarks/fw_pool.py --irrelevant 0,4
    .venv/bin/python benchmarks/fw_pool.py --irrelevant 0 --only soft --out /tmp/soft.json   # FW-Soft rows only

Prints a markdown table (ACC %, seconds per merge) and writes
``benchmarks/results/fw_pool.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load_file

from mergeflow.architecture import resolve_projection
from mergeflow.evaluation import build_evaluator
from mergeflow.evaluation.calibration import build_objective
from mergeflow.examples.digits import build_digits_suite
from mergeflow.merging.batch import batch_merge
from mergeflow.merging.engine import fold, new_state
from mergeflow.merging.export import export
from mergeflow.merging.pool import pool_merge
from mergeflow.merging.state import BaseRef
from mergeflow.merging.tensors import DictReader, DictWriter

HERE = Path(__file__).resolve().parent
RELEVANT = 4


def damaged(base: dict, ck: dict, kind: str, seed: int) -> dict:
    """A damaged copy of ``ck``: its task vector negated, tripled, or replaced by same-norm noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        tau = ck[k] - b
        if kind == "negated":
            out[k] = b - tau
        elif kind == "tripled":
            out[k] = b + 3 * tau
        else:
            noise = torch.randn(b.shape, generator=g)
            out[k] = b + noise * (tau.norm() / noise.norm().clamp(min=1e-12))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--irrelevant", default="0,4,8,16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only", help="comma-separated run kinds (fw, soft, ada, ta, ties, opcm); default all"
    )
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "quality" / "digits")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fw_pool.json")
    args = ap.parse_args(argv)
    t_start = time.time()
    suite = build_digits_suite(args.work, n_tasks=8, seed=args.seed, log=lambda m: print("  " + m))
    base = load_file(str(suite.base / "model.safetensors"))
    config = json.loads((suite.base / "config.json").read_text())
    cks = {p.name: load_file(str(p / "model.safetensors")) for p in suite.checkpoints}
    ids = list(suite.checkpoint_ids)
    relevant, unrelated = ids[:RELEVANT], ids[RELEVANT:]
    backbone = {c: {k: v for k, v in cks[c].items() if k in base} for c in ids}
    heads = {c: {k: v for k, v in cks[c].items() if k not in base} for c in ids}
    es_all = suite.evaluation_suite()
    es = es_all.model_copy(update={"tasks": es_all.tasks[:RELEVANT]})
    evaluator = build_evaluator(es, model_config=config)
    kinds = ("negated", "tripled", "noise")
    extra: list[tuple[str, dict]] = [(c, backbone[c]) for c in unrelated]
    for j in range(32):
        src = relevant[j % RELEVANT]
        kind = kinds[j % len(kinds)]
        extra.append((f"{src}-{kind}-{j}", damaged(base, backbone[src], kind, args.seed + j)))
    br = DictReader(base, "base")
    projection = resolve_projection(br, config)
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, list[float]] = {}
    for n_irr in (int(x) for x in args.irrelevant.split(",")):
        pool = [(c, backbone[c]) for c in relevant] + extra[:n_irr]
        readers = [DictReader(t, name) for name, t in pool]
        row: dict[str, float] = {}

        def score(merged: dict) -> float:
            s = evaluator.evaluate(DictReader(merged, "merged"), heads, es.tasks, "test")
            return statistics.mean(s.values())

        for label, run, fw_params in (
            ("fw_merging (FusionBench defaults)", "fw", {}),
            ("fw_merging, step_size 1", "fw", {"step_size": 1.0}),
            ("fw_merging, init base, step_size 1", "fw", {"step_size": 1.0, "init": "base"}),
            ("fw_soft, the authors' entropy coefficients", "soft", {"ada_loss": "entropy"}),
            ("fw_soft (defaults: cross-entropy coefficients)", "soft", {}),
            ("learned coefficients (batch_adamerging)", "ada", {}),
            ("task arithmetic (s=0.3)", "ta", {}),
            ("TIES (defaults)", "ties", {}),
            ("OPCM (α=0.5, continual)", "opcm", {}),
        ):
            if args.only and run not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            out = DictWriter()
            if run in ("fw", "soft", "ada"):
                method = {"fw": "fw_merging", "soft": "fw_soft", "ada": "batch_adamerging"}[run]
                objective = build_objective(
                    es,
                    config,
                    {c: heads[c] for c in relevant},
                    relevant,
                    batch_size=32 if run == "ada" else 100,
                    seed=args.seed,
                    loss="auto" if run == "ada" else "cross_entropy",
                )
                pool_merge(method, fw_params, br, readers, out, objective, log=None)
                merged = out.tensors
            elif run in ("ta", "ties"):
                batch_merge(
                    "batch_task_arithmetic" if run == "ta" else "batch_ties", {}, br, readers, out
                )
                merged = out.tensors
            else:
                info = new_state("opcm", {}, BaseRef(uri="base", digest="b"), projection)
                state = None
                for i, r in enumerate(readers):
                    w = DictWriter()
                    info = fold(info, state, br, r, checkpoint_id=r.source, digest=str(i), out=w)
                    state = w.reader()
                export(info, state, br, out)
                merged = out.tensors
            secs = time.perf_counter() - t0
            acc = score(merged)
            row[label] = acc
            seconds.setdefault(label, []).append(secs)
            print(
                f"  {n_irr:2d} irrelevant  {label:42s} ACC {100 * acc:5.1f}  ({secs:.1f} s)",
                flush=True,
            )
        results[str(n_irr)] = row
    individual = statistics.mean(
        evaluator.evaluate(DictReader(backbone[c], c), heads, [t], "test")[t.name]
        for c, t in zip(relevant, es.tasks, strict=True)
    )
    labels = list(next(iter(results.values())))
    lines = [
        f"relevant tasks: {', '.join(t.name for t in es.tasks)}; individual fine-tunes ACC {100 * individual:.1f}",
        "",
        "| method | "
        + " | ".join(f"+{n} irrelevant" for n in results)
        + " | s per merge (median) |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for label in labels:
        accs = " | ".join(f"{100 * results[n][label]:.1f}" for n in results)
        lines.append(f"| {label} | {accs} | {statistics.median(seconds[label]):.1f} |")
    print("\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"acc": results, "seconds": seconds, "individual": individual}, indent=1)
    )
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"\nwall {time.time() - t_start:.0f} s, load {' '.join(load)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
