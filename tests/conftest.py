"""Shared pytest fixtures. Service fixtures live in their own modules and are imported here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]

# Real local servers (SeaweedFS S3; Prefect + MLflow + S3 stack), started once per session when used.
pytest_plugins = ["fixtures_s3", "fixtures_stack"]


def tiny_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small model: non-square linears with biases, an embedding, a norm and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "embed.weight": torch.randn(20, 8, generator=g),
        "layers.0.fc.weight": torch.randn(12, 8, generator=g),
        "layers.0.fc.bias": torch.randn(12, generator=g),
        "layers.0.out.weight": torch.randn(8, 12, generator=g),
        "layers.0.norm.weight": torch.ones(8),
        "layers.1.fc.weight": torch.randn(12, 8, generator=g),
        "layers.1.out.weight": torch.randn(8, 12, generator=g),
        "position_ids": torch.arange(6),
    }
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()}


def finetune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A fake fine-tune: base + a low-rank-plus-noise task vector on every float tensor."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        d = torch.randn(v.shape, generator=g) * scale
        if v.dim() == 2:
            u = torch.randn(v.shape[0], 1, generator=g)
            w = torch.randn(1, v.shape[1], generator=g)
            d = d + scale * 3 * (u @ w) / (v.shape[0] * v.shape[1]) ** 0.25
        out[k] = (v.float() + d).to(v.dtype)
    return out


@pytest.fixture
def model_files(tmp_path: Path) -> Callable[..., tuple[Path, list[Path]]]:
    """Write a base and ``n`` fine-tuned checkpoints as .safetensors files; returns their paths."""

    def make(
        n: int = 3, dtype: torch.dtype = torch.float32, heads: bool = False
    ) -> tuple[Path, list[Path]]:
        base = tiny_state(0, dtype)
        bp = tmp_path / "base.safetensors"
        save_file(base, str(bp))
        cps = []
        for i in range(n):
            ck = finetune(base, i)
            if heads:
                ck["head.weight"] = torch.randn(3, 8, generator=torch.Generator().manual_seed(i))
            p = tmp_path / f"ckpt{i}.safetensors"
            save_file(ck, str(p))
            cps.append(p)
        return bp, cps

    return make


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mergeflow ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mergeflow", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


class Result:
    """What an in-process CLI call returned and printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run ``mergeflow.cli.main`` in this process (fast); an unexpected exception fails the test."""
    from mergeflow.cli import main

    def call(*args: object) -> Result:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            rc = int(e.code or 0)
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)

    return call


def fold_in_memory(method, base, ckpts, params=None, options=None, dtype=None):
    """Fold ``ckpts`` into ``base`` with the engine over in-memory readers; returns (merged, info)."""
    from mergeflow.merging import engine
    from mergeflow.merging.io import DictReader, DictWriter
    from mergeflow.merging.projection import by_name_rules
    from mergeflow.merging.state import BaseRef

    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state(method, params or {}, BaseRef(uri="base", digest="d"), rule, options)
    state = None
    for i, c in enumerate(ckpts):
        w = DictWriter()
        info = engine.fold(
            info, state, br, DictReader(c, f"c{i}"), checkpoint_id=f"c{i}", digest=f"d{i}", out=w
        )
        state = w.reader()
    out = DictWriter()
    engine.export(info, state, br, out, dtype=dtype)
    return out.tensors, info
