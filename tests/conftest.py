"""Shared pytest fixtures and the test tiers.

Plain helpers (tiny models, running the CLI, the Hub stand-in) live in ``tests/helpers/``;
service fixtures live in ``fixtures_s3.py`` and ``fixtures_stack.py`` and are registered here,
once, through ``pytest_plugins``.

Tiers (markers): ``unit`` (fast, in-process, no servers), ``services`` (real local servers:
S3, Prefect, MLflow), ``slow`` (more than a few seconds), ``postgres`` (the local PostgreSQL;
implies ``services``), ``reliability`` (long runs: fuzzing, kill matrix, load; in no default
tier, ``./scripts/reliability.sh`` runs them). A test marked neither ``services`` nor ``slow`` is ``unit``. Plain
``pytest`` runs the unit tier (``-m unit`` in ``addopts``); ``./scripts/test.sh`` runs all tiers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli import Result
from helpers.models import finetune, tiny_state
from safetensors.torch import save_file

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]

# Real local servers (SeaweedFS S3; Prefect + MLflow + S3 stack), started once per session when used.
# Declared here only: test modules use these fixtures without registering them again.
pytest_plugins = ["fixtures_s3", "fixtures_stack"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every test in a tier: ``postgres`` implies ``services``; neither ``services`` nor
    ``slow`` means ``unit``."""
    for item in items:
        if item.get_closest_marker("postgres") and not item.get_closest_marker("services"):
            item.add_marker(pytest.mark.services)
        if not (
            item.get_closest_marker("services")
            or item.get_closest_marker("slow")
            or item.get_closest_marker("reliability")  # long runs: scripts/reliability.sh only
        ):
            item.add_marker(pytest.mark.unit)
    # Long reliability runs only when asked for by name (-m reliability), whatever else marks them.
    if "reliability" not in (config.getoption("markexpr") or ""):
        long_runs = [i for i in items if i.get_closest_marker("reliability")]
        if long_runs:
            config.hook.pytest_deselected(items=long_runs)
            items[:] = [i for i in items if not i.get_closest_marker("reliability")]


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
