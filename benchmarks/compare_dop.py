"""DOP and NUFILT beside FusionBench's DOP on ViT-B/32 shapes (``compare.py --suite vit-b32-dop``).

Two tables, each system its own process under ``/usr/bin/time -v`` (as in compare.py):

* **time**: one ViT-B/32 encoder layer at real widths (4 attention matrices 768×768, fc1
  3072×768, fc2 768×3072), base + 2 checkpoints, so one optimising fold; ``--dop-steps``
  Adam steps for both DOPs (default 20 of their 200: a DOP fold is 200 steps of a few
  full-size matrix products per matrix, about an hour per fold for FusionBench on 2 cores at
  12 layers). Time is linear in layers and steps for every system here, so the ratio stands
  for the full model up to the SVDs' share, which fewer steps overstate (printed).
  ``--rounds`` rounds, alternating, medians.
* **memory**: the whole 12-layer vit-b32 suite (compare.py's), base + 2 checkpoints, 1 Adam
  step: peak RSS, which does not depend on the step count.

Systems: ``mergeflow dop`` / ``nufilt`` / ``opcm`` (the streaming engine, as ``state fold``
runs it) and ``fusionbench dop`` (FusionBench 0.2.33's ``dop_general.DOPMerging`` with its
config defaults, except ``num_steps``, on CPU, from building its model pool to the merged
model). The error column of ``mergeflow dop`` is its worst per-tensor distance to
FusionBench's output, relative to FusionBench's task vector (agreement at full size).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import compare as c
import torch
from safetensors.torch import save_file

TIME_SUITE = "vit-b32-1layer"
c.SUITES[TIME_SUITE] = {"layout": "clip-1", "dtype": "float32", "n": 2, "deltas": "structured"}


def load_trainable(path: str) -> torch.nn.Module:
    """compare.load_module with trainable parameters: DOP optimises only weights that require grad."""
    return c.load_module(path).requires_grad_(True)


def drive_fusionbench_dop(base: str, cks: list[str], out: str, steps: int) -> None:
    """FusionBench's DOPMerging (config/method/dop/dop_general.yaml defaults but ``num_steps``)."""
    import lightning as L
    from fusion_bench.method.dop.dop_general import DOPMerging
    from fusion_bench.modelpool import BaseModelPool

    target = "compare_dop.load_trainable"
    t0 = time.perf_counter()
    models = {"_pretrained_": {"_target_": target, "path": base}}
    models |= {f"ckpt_{i}": {"_target_": target, "path": p} for i, p in enumerate(cks)}
    algo = DOPMerging(
        seed=0,
        shuffle_order=False,
        save_on_every_step=False,
        evaluate_on_every_step=False,
        lr=1e-4,
        num_steps=steps,
        mgda=True,
        ema=True,
        ema_beta=0.999,
        alpha=0.8,
        svd_epsilon=0.99999,
        svd_proj_space="uv",
    )
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    merged = algo.run(BaseModelPool(models))
    seconds = time.perf_counter() - t0
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(c.tensors_of(merged), str(Path(out) / "model.safetensors"))
    print(json.dumps({"seconds": seconds}))


def _systems(suite: str, steps: int, skip_fb: bool) -> tuple[dict, Path, Path]:
    base, cks = c.build(suite)
    out = c.WORK / suite / "out-dop"
    args = [str(base), *map(str, cks[:2])]
    dop = json.dumps({"steps": steps})
    systems = {
        "mergeflow dop": c._self("mergeflow", "dop", str(out / "dop"), dop, *args),
        "mergeflow nufilt": c._self("mergeflow", "nufilt", str(out / "nufilt"), "{}", *args),
        "mergeflow opcm": c._self("mergeflow", "opcm", str(out / "opcm"), "{}", *args),
    }
    if not skip_fb:
        systems["fusionbench dop"] = c._self(
            "fusionbench-dop", str(out / "fb"), str(steps), *args, python=c._fb_python()
        )
    return systems, out, base


def suite_dop(rounds: int, steps: int, skip_fb: bool, tables: str = "time,memory") -> None:
    """Print the time table (one layer, ``steps`` steps) and the memory table (12 layers, 1 step)."""
    for title, suite, n_steps, n_rounds in (
        (f"DOP time: 1 ViT-B/32 layer, {steps} Adam steps", TIME_SUITE, steps, rounds),
        ("DOP memory: 12 ViT-B/32 layers, 1 Adam step", "vit-b32", 1, 1),
    ):
        if ("time" if suite == TIME_SUITE else "memory") not in tables.split(","):
            continue
        print(f"\n== {title} ==", flush=True)
        systems, out, base = _systems(suite, n_steps, skip_fb)
        res = c._rounds(systems, n_rounds)
        rows = []
        for name, runs in res.items():
            row = c._row(name, runs, 1)
            if name == "mergeflow dop" and runs and res.get("fusionbench dop"):
                c.export_state(out / "dop", base, out / "dop-model")
                row["error"] = c._worst_error(out / "dop-model", out / "fb", base)
            rows.append(row)
        print(f"\n### {title}\n")
        print("| system | s for 2 checkpoints (median) | peak RSS MiB | error vs FusionBench dop | runs | load |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for r in rows:
            err = f"{r['error']:.2e}" if "error" in r else "-"
            print(
                f"| {r['system']} | {r['per_fold']:.1f} | {r['rss']:.0f} | {err} | {r['runs']} | {r.get('load', float('nan')):.1f} |"  # fmt: skip
            )
        by = {r["system"]: r for r in rows}
        for name in ("mergeflow dop", "mergeflow nufilt"):
            if name in by and "fusionbench dop" in by and by["fusionbench dop"]["runs"]:
                a, b = by[name], by["fusionbench dop"]
                print(
                    f"- {name} / fusionbench dop: time {a['per_fold'] / b['per_fold']:.2f}x, "
                    f"peak RSS {a['rss'] / b['rss']:.2f}x"
                )
