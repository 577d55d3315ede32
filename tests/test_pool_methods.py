"""Pool methods (fw_merging, batch_adamerging): the math against float64 references written here,
the CLI with calibration data, and every bad-input path with nothing written."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.errors import CheckpointError
from mergeflow.merging.pool import pool_merge
from mergeflow.merging.state import FoldOptions
from mergeflow.merging.tensors import DictReader, DictWriter

F64 = FoldOptions(compute_dtype="float64")


def model(seed: int, base: Mapping[str, torch.Tensor] | None = None, scale: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "a.weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
            "a.bias": torch.randn(3, generator=g, dtype=torch.float64),
            "b.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        }
    return {
        k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()
    }


class Quadratic:
    """‖θ − target‖² (its gradient is 2(θ − target))."""

    tasks = ("toy",)

    def __init__(self, target: Mapping[str, torch.Tensor]) -> None:
        self.target = target

    def __call__(self, tensors: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(((tensors[k] - self.target[k]) ** 2).sum() for k in tensors)


def merge_pool(method: str, params: dict, base, cks, objective) -> DictWriter:
    """``pool_merge`` of ``cks`` over ``base`` in float64, into an in-memory writer."""
    out = DictWriter()
    pool_merge(
        method,
        params,
        DictReader(base, "base"),
        [DictReader(c, f"c{i}") for i, c in enumerate(cks)],
        out,
        objective,
        options=F64,
        log=None,
    )
    return out


def fw_reference(base, cks, target, iters=10, step_size=0.1, lam=0.3, from_base=False):
    """FW-Hard as the authors' code runs it, on whole in-memory models in float64."""
    init = {k: base[k] + (0 if from_base else lam) * sum(c[k] - base[k] for c in cks) for k in base}
    theta = {k: v.clone() for k, v in init.items()}
    cands = [*cks, init]
    for t in range(iters):
        g = {k: 2 * (theta[k] - target[k]) for k in base}
        scores = [
            sum(float(g[k].flatten() @ c[k].flatten() / (g[k].norm() * c[k].norm())) for k in base)
            for c in cands
        ]
        m = cands[int(np.argmin(scores))]
        gamma = 2 / (t + 2) * step_size
        theta = {k: theta[k] + gamma * lam * (m[k] - theta[k]) for k in base}
    return theta


@pytest.mark.parametrize(
    "params", [{}, {"step_size": 1.0}, {"step_size": 1.0, "init": "base", "max_iters": 7}]
)
def test_fw_merging_equals_the_authors_algorithm_on_a_known_loss(params: dict) -> None:
    base = model(0)
    cks = [model(i, base) for i in range(1, 5)]
    target = {k: base[k] + 0.8 * (cks[1][k] - base[k]) for k in base}
    out = merge_pool("fw_merging", params, base, cks, Quadratic(target))
    want = fw_reference(
        base,
        cks,
        target,
        iters=params.get("max_iters", 10),
        step_size=params.get("step_size", 0.1),
        from_base=params.get("init") == "base",
    )
    for k in base:
        assert torch.allclose(out.tensors[k], want[k], atol=1e-12), k
    # the loss went down from task arithmetic's
    ta = {k: base[k] + 0.3 * sum(c[k] - base[k] for c in cks) for k in base}
    assert Quadratic(target)(out.tensors, 0) < Quadratic(target)(ta, 0)


def test_batch_adamerging_learns_per_tensor_coefficients_of_a_known_optimum() -> None:
    base = model(0)
    cks = [model(i, base) for i in range(1, 3)]
    lam = {"a.weight": (0.9, 0.2), "a.bias": (0.1, 1.1), "b.weight": (0.5, 0.5)}
    target = {k: base[k] + sum(lam[k][i] * (cks[i][k] - base[k]) for i in range(2)) for k in base}
    out = merge_pool("batch_adamerging", {"steps": 500, "lr": 0.05}, base, cks, Quadratic(target))
    for k in base:
        assert torch.allclose(out.tensors[k], target[k], atol=2e-3), k


def test_batch_adamerging_learns_per_row_coefficients_of_a_known_optimum() -> None:
    """granularity=row (the default): one coefficient per checkpoint and output row of each
    matrix, one per checkpoint for a vector; a target with different rows is reached exactly."""
    base = model(0)
    cks = [model(i, base) for i in range(1, 3)]
    lam = {
        "a.weight": (torch.tensor([0.9, 0.2, 0.6]), torch.tensor([0.2, 1.0, 0.4])),
        "a.bias": (0.1, 1.1),
        "b.weight": (torch.tensor([0.5, 1.2]), torch.tensor([0.7, -0.3])),
    }

    def times(c, x):
        return x * c[:, None] if isinstance(c, torch.Tensor) else x * c

    target = {
        k: base[k] + sum(times(lam[k][i], cks[i][k] - base[k]) for i in range(2)) for k in base
    }
    for granularity, reached in (("row", True), ("tensor", False)):
        params = {"steps": 600, "lr": 0.05, "granularity": granularity}
        out = merge_pool("batch_adamerging", params, base, cks, Quadratic(target))
        close = [torch.allclose(out.tensors[k], target[k], atol=2e-3) for k in base]
        # one coefficient per tensor cannot fit rows that want different ones
        assert close == ([True] * 3 if reached else [False, True, False]), granularity


class Diverging:
    tasks = ("toy",)

    def __call__(self, tensors, step):
        return sum(t.sum() for t in tensors.values()) * math.nan


@pytest.mark.parametrize("method", ["fw_merging", "batch_adamerging"])
def test_a_diverging_pool_merge_writes_nothing(method: str) -> None:
    base = model(0)
    out = DictWriter()
    with pytest.raises(CheckpointError, match="loss became nan.*nothing was written"):
        pool_merge(
            method, {}, DictReader(base), [DictReader(model(1, base))], out, Diverging(), log=None
        )
    assert not out.committed and out.tensors == {}


def _mlp_files(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """A tiny MLP base, two checkpoints with heads, calibration npz files and a suite JSON."""
    from mergeflow.evaluation.models import MLP

    cfg = {"mergeflow_architecture": "mlp", "in_features": 4, "hidden": [3], "num_labels": 2}
    torch.manual_seed(0)
    base_m = MLP(cfg)
    sd = {k: v.detach() for k, v in base_m.state_dict().items()}
    bd = tmp_path / "base"
    bd.mkdir()
    backbone = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    save_file(backbone, str(bd / "model.safetensors"))
    (bd / "config.json").write_text(json.dumps(cfg))
    cks, tasks = [], []
    rng = np.random.default_rng(0)
    for i in range(2):
        d = tmp_path / f"ck{i}"
        d.mkdir()
        ck = {k: v + 0.1 * torch.randn(v.shape) for k, v in sd.items()}
        save_file(ck, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        data = tmp_path / "data" / f"t{i}"
        data.mkdir(parents=True)
        for split in ("calibration", "validation", "test"):
            np.savez(
                data / f"{split}.npz",
                x=rng.normal(size=(20, 4)).astype(np.float32),
                labels=rng.integers(0, 2, 20),
            )
        tasks.append({"name": f"t{i}", "checkpoint": f"ck{i}", "data": str(data / "{split}.npz")})
        cks.append(d)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"tasks": tasks}))
    return bd, cks, suite


@pytest.mark.parametrize("method", ["fw_merging", "batch_adamerging"])
def test_cli_merge_with_a_pool_method_reads_calibration_data(cli, tmp_path, method) -> None:
    bd, cks, suite = _mlp_files(tmp_path)
    out = tmp_path / "out"
    extra = ["--param", "steps=5"] if method == "batch_adamerging" else ["--param", "max_iters=3"]
    r = cli(
        "merge",
        "--base",
        bd,
        "--method",
        method,
        "--calibration",
        suite,
        *extra,
        "--out",
        out,
        *cks,
    )
    assert r.returncode == 0, r.stderr
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(load_file(str(bd / "model.safetensors")))
    assert all(bool(torch.isfinite(v).all()) for v in merged.values())
    assert ("iteration 1/3" if method == "fw_merging" else "step 5/5") in r.stderr


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (None, "learns from calibration data: pass --calibration"),
        ("unknown-checkpoint", "names checkpoint 'nope', which is not among the CHECKPOINTs"),
        ("no-calibration", "has no calibration data"),
        ("bad-json", "is not valid YAML or JSON"),
        ("missing-file", "--calibration"),
    ],
)
def test_cli_pool_merge_refuses_bad_calibration_and_writes_nothing(cli, tmp_path, mutate, message):
    bd, cks, suite = _mlp_files(tmp_path)
    args = ["--calibration", suite]
    if mutate is None:
        args = []
    elif mutate == "unknown-checkpoint":
        doc = json.loads(suite.read_text())
        doc["tasks"][0]["checkpoint"] = "nope"
        suite.write_text(json.dumps(doc))
    elif mutate == "missing-file":
        suite.unlink()
    elif mutate == "no-calibration":
        (tmp_path / "data" / "t0" / "calibration.npz").unlink()
    else:
        suite.write_text("{tasks: [")
    out = tmp_path / "out"
    r = cli("merge", "--base", bd, "--method", "fw_merging", *args, "--out", out, *cks)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("mergeflow: error:") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_adamerging_merge_equals_state_fold_one_at_a_time(cli, tmp_path) -> None:
    """The continual learned method in the CLI: each fold's objective covers the tasks folded so
    far (heads read back from the state), so two state folds give the merge's bits."""
    bd, cks, suite = _mlp_files(tmp_path)
    one = tmp_path / "one"
    r = cli("merge", "--base", bd, "--method", "adamerging", "--param", "steps=4",
            "--calibration", suite, "--out", one, *cks)  # fmt: skip
    assert r.returncode == 0, r.stderr
    state = tmp_path / "state"
    r = cli("state", "init", "--state", state, "--base", bd, "--method", "adamerging",
            "--param", "steps=4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("state", "fold", "--state", state, cks[0])
    assert r.returncode == 2 and "pass --calibration" in r.stderr  # refused before any work
    for c in cks:
        r = cli("state", "fold", "--state", state, "--calibration", suite, c)
        assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    assert cli("state", "export", "--state", state, "--out", two).returncode == 0
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(bd / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)
