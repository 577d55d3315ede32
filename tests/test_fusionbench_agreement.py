"""`mergeflow merge --method opcm` agrees with FusionBench's own OPCM.

The expected merges in ``tests/data/fusionbench/`` were produced by
``fusion_bench.method.opcm.opcm_general.OPCM`` (alpha 0.5, no shuffling) by
``benchmarks/fusionbench_reference.py``; see the README there for versions. The error is the
worst per-tensor relative Frobenius error measured against the task-vector norm,
max over tensors of ||ours - ref|| / ||ref - base||.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "tests" / "data" / "fusionbench"


def _merge(out: Path, n_tasks: int) -> dict[str, torch.Tensor]:
    """Run the mergeflow CLI over task_0..task_{n-1} and load the merged model."""
    cmd = [
        sys.executable,
        "-m",
        "mergeflow",
        "merge",
        "--base",
        str(DATA / "base.safetensors"),
        "--method",
        "opcm",
        "--param",
        "alpha=0.5",
        "--out",
        str(out),
        *[str(DATA / f"task_{t}.safetensors") for t in range(n_tasks)],
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mergeflow merge failed ({proc.returncode}):\n{proc.stderr}"
    return load_file(str(out / "model.safetensors"))


def _worst_error(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> tuple[float, str]:
    """Max over tensors of ||ours - ref|| / ||ref - base||; tensors with ref == base must match base."""
    worst, worst_key = 0.0, ""
    for key, ref_t in ref.items():
        mine, b = ours[key].double(), base[key].double()
        denom = (ref_t.double() - b).norm().item()
        if denom == 0.0:
            assert torch.equal(ours[key], base[key]), f"{key}: reference equals base, ours differs"
            continue
        err = (mine - ref_t.double()).norm().item() / denom
        if err > worst:
            worst, worst_key = err, key
    return worst, worst_key


@pytest.mark.parametrize(("n_tasks", "tolerance"), [(2, 1e-3), (6, 6e-2)])
def test_opcm_matches_fusionbench(tmp_path: Path, n_tasks: int, tolerance: float) -> None:
    """OPCM over the first n task checkpoints matches FusionBench within the issue's tolerance."""
    base = load_file(str(DATA / "base.safetensors"))
    ref = load_file(str(DATA / f"expected_step{n_tasks}.safetensors"))
    ours = _merge(tmp_path / "out", n_tasks)

    assert set(ours) == set(ref), f"tensor names differ: {sorted(set(ours) ^ set(ref))}"
    for key, ref_t in ref.items():
        assert ours[key].dtype == ref_t.dtype, f"{key}: dtype {ours[key].dtype} != {ref_t.dtype}"
        assert ours[key].shape == ref_t.shape, f"{key}: shape {ours[key].shape} != {ref_t.shape}"

    worst, key = _worst_error(ours, ref, base)
    print(f"FusionBench agreement after {n_tasks} folds: worst error {worst:.3e} ({key})")
    assert worst <= tolerance, f"worst error {worst:.3e} on {key} exceeds {tolerance:.0e}"
