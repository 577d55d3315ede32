"""`mergeflow demo` end to end on the session stack, twice: the second run folds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.services, pytest.mark.slow]
N = 3


def _demo(
    stack: RunningStack, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    s = stack.settings
    env = {
        **os.environ,
        **stack.full_env(),
        "MERGEFLOW_HOME": str(s.home),
        "MERGEFLOW_PREFECT_PORT": str(s.prefect_port),
        "MERGEFLOW_MLFLOW_PORT": str(s.mlflow_port),
        "MERGEFLOW_S3_PORT": str(s.s3_port),
        "MERGEFLOW_BUCKET": s.bucket,
    }
    return subprocess.run(
        [sys.executable, "-m", "mergeflow", "demo", "--checkpoints", str(N), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_registers_n_versions_and_a_second_run_folds_nothing(stack: RunningStack) -> None:
    from mergeflow.cli.demo import LINEAGE
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_store

    first = _demo(stack, "--timeout", "540")
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert f"done: {N} versions of {LINEAGE} registered" in out
    assert stack.prefect_ui_url in out and stack.mlflow_url in out
    assert out.count("publishing ") == N
    assert "stopped the served deployments the demo started" in out  # the session stack stays up

    versions = Registry().versions(LINEAGE)
    assert [v.checkpoint_id for v in versions] == ["01-rot90", "02-flip_lr", "03-invert"]
    assert [v.step for v in versions] == [1, 2, 3]
    assert versions[0].parent_version is None
    for prev, v in zip(versions, versions[1:], strict=False):
        assert v.parent_version == prev.version  # each fold built on the previous accepted one
    for v in versions:
        assert v.status == "accepted"
        assert v.model_uri.startswith(f"s3://{stack.bucket}/lineages/{LINEAGE}/steps/")
        model = open_store(v.model_uri)
        assert model.exists("config.json") and model.exists("model.safetensors")
        assert {f"test/{t}" for t in ("rot90", "flip_lr", "invert")[: v.step]} <= set(v.metrics)
    assert "champion" in versions[-1].aliases and "newest" in versions[-1].aliases
    assert "test/bwt" in versions[-1].metrics

    # the chain from the CLI, and a re-evaluation that reproduces the registered test score
    show = subprocess.run(
        [sys.executable, "-m", "mergeflow", "lineage", "show", LINEAGE],
        env={**os.environ, **stack.full_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr
    assert "opcm" in show.stdout and "03-invert" in show.stdout
    from mergeflow.flows.maintenance import reevaluate_flow

    ev = reevaluate_flow(LINEAGE, versions[0].version)
    assert ev.test["rot90"] == pytest.approx(versions[0].metrics["test/rot90"])

    second = _demo(stack, "--timeout", "300")
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    assert "publishing " not in out2
    assert [v.version for v in Registry().versions(LINEAGE)] == [v.version for v in versions]
