"""Peak memory of `mergeflow merge --method opcm` over 2 and 5 checkpoints, beside FusionBench's OPCM.

Builds a 384 MiB model (96 tensors of 512x2048 float32) and 5 checkpoints under
``benchmarks/_work/memory`` and runs each merge under ``/usr/bin/time -v`` (peak RSS of
the process). FusionBench's ``OPCM`` runs in its own venv (see fusionbench_reference.py)
on the same files, loading each model lazily through its model pool.

    .venv/bin/python benchmarks/memory.py [--skip-fusionbench]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "memory"
N_TENSORS, SHAPE = 96, (512, 2048)


def build(work: Path, n_ckpts: int = 5) -> tuple[Path, list[Path]]:
    """Write base + checkpoints (one file each), tensor by tensor to keep this script small too."""
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base.safetensors"
    cks = [work / f"ckpt_{i}.safetensors" for i in range(n_ckpts)]
    if base.exists() and all(c.exists() for c in cks):
        return base, cks
    g = torch.Generator().manual_seed(0)
    b = {f"layers.{i}.weight": torch.randn(SHAPE, generator=g) * 0.02 for i in range(N_TENSORS)}
    save_file(b, str(base))
    for j, c in enumerate(cks):
        gj = torch.Generator().manual_seed(100 + j)
        save_file({k: v + 0.002 * torch.randn(SHAPE, generator=gj) for k, v in b.items()}, str(c))
    return base, cks


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run under /usr/bin/time -v; return (peak RSS MiB, wall seconds)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb / 1024, wall


def load_linear_stack(path: str) -> torch.nn.Module:
    """FusionBench side: the model as an nn.Module (96 bias-free Linear layers)."""
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList(
        torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False) for _ in range(N_TENSORS)
    )
    m.load_state_dict(load_file(path), strict=True)
    return m.eval()


def fusionbench_driver(n: int) -> None:
    """Inside the FusionBench venv: OPCM over the first n checkpoints, models loaded lazily by the pool."""
    import lightning as L
    from fusion_bench.method.opcm.opcm_general import OPCM
    from fusion_bench.modelpool import BaseModelPool

    target = "memory.load_linear_stack"
    models = {"_pretrained_": {"_target_": target, "path": str(WORK / "base.safetensors")}}
    models |= {
        f"ckpt_{i}": {"_target_": target, "path": str(WORK / f"ckpt_{i}.safetensors")}
        for i in range(n)
    }
    algo = OPCM(
        alpha=0.5,
        shuffle_order=False,
        seed=None,
        save_on_every_step=False,
        evaluate_on_every_step=False,
    )
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    algo.run(BaseModelPool(models))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-fusionbench", action="store_true", help="measure mergeflow only")
    ap.add_argument("--fusionbench-driver", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fusionbench_driver:
        fusionbench_driver(args.fusionbench_driver)
        return
    base, cks = build(WORK)
    size = sum(p.stat().st_size for p in [base]) / 2**20
    print(
        f"model: {N_TENSORS} tensors of {SHAPE[0]}x{SHAPE[1]} float32 = {size:.0f} MiB per file, {len(cks)} checkpoints"
    )
    floor, _ = timed([sys.executable, "-c", "import torch, safetensors, mergeflow.merging.engine"])
    rows = [("python + torch import (floor)", "-", floor, 0.0)]
    for n in (2, 5):
        out = WORK / f"out_{n}"
        rss, wall = timed(
            [
                sys.executable,
                "-m",
                "mergeflow",
                "merge",
                "--base",
                str(base),
                "--method",
                "opcm",
                "--device",
                "cpu",
                "--no-progress",
                "--overwrite",
                "--out",
                str(out),
                *map(str, cks[:n]),
            ]
        )
        rows.append(("mergeflow merge --method opcm", str(n), rss, wall))
    if not args.skip_fusionbench:
        sys.path.insert(0, str(HERE))
        from fusionbench_reference import ensure_venv, venv_python

        ensure_venv()
        for n in (2, 5):
            rss, wall = timed(
                [
                    str(venv_python()),
                    "-c",
                    f"import sys; sys.path.insert(0, {str(HERE)!r}); import memory; memory.fusionbench_driver({n})",
                ]
            )
            rows.append(("FusionBench OPCM (opcm_general)", str(n), rss, wall))
    print("\n| run | checkpoints | peak RSS (MiB) | wall (s) |\n|---|---|---|---|")
    for name, n, rss, wall in rows:
        print(f"| {name} | {n} | {rss:.0f} | {wall:.1f} |")
    ours = {r[1]: r for r in rows if r[0].startswith("mergeflow")}
    print(
        f"\nmergeflow peak RSS 5 vs 2 checkpoints: {ours['5'][2] / ours['2'][2]:.3f}x (flat means ~1.0)"
    )
    fb = {r[1]: r for r in rows if r[0].startswith("FusionBench")}
    if fb:
        for n in ("2", "5"):
            print(
                f"{n} checkpoints: FusionBench/mergeflow peak RSS {fb[n][2] / ours[n][2]:.2f}x, wall {fb[n][3] / ours[n][3]:.2f}x"
            )


if __name__ == "__main__":
    main()
