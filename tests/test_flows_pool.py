"""Pool lineages on the REAL stack: `lineage rebuild --method batch_adamerging|fw_merging` merges an
OPCM lineage's checkpoints as ONE pool on their tasks' calibration data, then evaluates, gates and
registers it like a fold; a checkpoint that arrives later is merged with the accepted pool again.

An OPCM lineage folds the digits MLP checkpoints t1, t2, t3 of ``test_flows`` in-process
(``backfill_flow``) against the session stack. Its suite also has a task for the ``noise``
checkpoint without a calibration split: a pool that holds ``noise`` is refused (a rebuild:
nothing created, nothing registered; an arrival: a rejected version saying what is missing).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_flows import MlpSuite, build_mlp_suite, lineage_spec

from mergeflow.errors import ConfigError

if TYPE_CHECKING:
    from fixtures_stack import RunningStack
    from helpers.cli import Result

pytestmark = [pytest.mark.services, pytest.mark.slow]

NEVER = "0 0 1 1 *"  # no watch runs during the test


def _versions(model: str) -> list[Any]:
    from mergeflow.storage.registry import Registry

    return Registry().versions(model)


@pytest.fixture(scope="module")
def origin(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, MlpSuite]:
    """OPCM over t1, t2, t3 (versions 1-3); every task has calibration data except noise's."""
    from mergeflow.evaluation.spec import EvaluationSuite, GateSpec, TaskSpec
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import save_lineage

    root = tmp_path_factory.mktemp("pool-lineage")
    suite = build_mlp_suite(root / "suite")
    no_calibration = {s: suite.data["t1"].replace("{split}", s) for s in ("validation", "test")}
    tasks = (
        *(TaskSpec(name=t, checkpoint=t, data=suite.data[t]) for t in ("t1", "t2", "t3", "t4")),
        TaskSpec(name="noise", checkpoint="noise", data=no_calibration),
    )
    name = f"pool-origin-{uuid.uuid4().hex[:6]}"
    spec = save_lineage(
        lineage_spec(
            name,
            suite,
            str(root / name),
            method="opcm",
            params={"alpha": 0.5},
            sources=(str(suite.root / "checkpoints"),),
            evaluation=EvaluationSuite(tasks=tasks),
            gate=GateSpec(min_acc=0.05),
            schedule=NEVER,
        )
    )
    outs = backfill_flow(spec.name, [str(suite.checkpoints[c]) for c in ("t1", "t2", "t3")])
    assert [o.status for o in outs] == ["accepted"] * 3
    return spec, suite


def test_rebuild_as_a_pool_merge_then_merge_arrivals_with_the_pool(
    origin: tuple[Any, MlpSuite], cli: Callable[..., Result], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from mergeflow.flows.fold import backfill_flow
    from mergeflow.flows.replay import rebuild_flow
    from mergeflow.lineage import derive_lineage, find_lineage, save_lineage
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_store

    spec, suite = origin
    new = f"pool-ada-{uuid.uuid4().hex[:6]}"
    r = cli("lineage", "rebuild", spec.name, "--as", new, "--method", "batch_adamerging",
            "--param", "steps=5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 pool merge(s)" in r.stdout
    (v1,) = _versions(new)
    assert (v1.status, v1.method, v1.step, v1.checkpoint_id) == (
        "accepted",
        "batch_adamerging",
        3,
        "t3",
    )
    assert [m.id for m in v1.pool] == ["t1", "t2", "t3"] and v1.parent_version is None
    assert [m.uri for m in v1.pool] == [str(suite.checkpoints[c]) for c in ("t1", "t2", "t3")]
    assert all(0.0 <= v1.metrics[f"test/{t}"] <= 1.0 for t in ("t1", "t2", "t3"))
    assert {"val/avg", "test/norm_avg", "fold_seconds"} <= set(v1.metrics)  # evaluated, gated
    text = MlflowClient().get_model_version(new, v1.version).description
    assert "| pool | batch_adamerging merge of 3 checkpoint(s): `t1`, `t2`, `t3` |" in text
    info = states.read_manifest(open_store(v1.state_uri)).info
    assert (info.method, info.params["steps"], info.scale) == ("batch_adamerging", 5, 1.0)
    assert [c.uri for c in info.checkpoints] == [m.uri for m in v1.pool]
    r = cli("lineage", "rebuild", spec.name, "--as", new, "--method", "batch_adamerging")
    assert r.returncode == 0 and "0 pool merge(s)" in r.stdout, r.stderr  # resumable: done
    assert len(_versions(new)) == 1
    r = cli("lineage", "show", new)
    assert r.returncode == 0 and "t3 (pool of 3)" in r.stdout, r.stdout + r.stderr
    r = cli("export", f"models:/{new}/1", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert "merged at once as one pool with the pool merging method `batch_adamerging`" in card

    # a checkpoint arriving later is merged with the accepted pool again: the next version
    (o2,) = backfill_flow(new, [str(suite.checkpoints["t4"])])
    v2 = _versions(new)[-1]
    assert (o2.status, v2.version, v2.parent_version, v2.step) == ("accepted", o2.version, "1", 4)
    assert [m.id for m in v2.pool] == ["t1", "t2", "t3", "t4"] and "test/t4" in v2.metrics
    # one whose task has no calibration data is a rejected version saying so
    (o3,) = backfill_flow(new, [str(suite.checkpoints["noise"])])
    v3 = _versions(new)[-1]
    assert o3.status == "rejected" and v3.state_uri == "", v3.reason
    assert "task 'noise' has no calibration split" in v3.reason

    # FW-Merging the same way, with small steps (in-process)
    fw = save_lineage(
        derive_lineage(
            spec,
            "rebuild",
            f"pool-fw-{uuid.uuid4().hex[:6]}",
            "3",
            method="fw_merging",
            params={"max_iters": 2, "examples": 32},
        )  # fmt: skip
    )
    (out,) = rebuild_flow(fw.name)
    (w1,) = _versions(fw.name)
    assert (out.status, w1.method, [m.id for m in w1.pool]) == (
        "accepted",
        "fw_merging",
        ["t1", "t2", "t3"],
    )

    # a pool that holds a checkpoint whose task has no calibration data is refused whole
    (o4,) = backfill_flow(spec.name, [str(suite.checkpoints["noise"])])  # the origin folds noise
    assert o4.version is not None
    bad = f"pool-bad-{uuid.uuid4().hex[:6]}"
    r = cli("lineage", "rebuild", spec.name, "--as", bad, "--method", "fw_merging")
    assert r.returncode == 2 and r.stderr.count("mergeflow: error:") == 1
    assert "task 'noise' has no calibration split" in r.stderr and "nothing was created" in r.stderr
    assert find_lineage(bad) is None and _versions(bad) == []
    # ... and by the flow itself (a lineage saved before its suite lost the split)
    saved = save_lineage(derive_lineage(spec, "rebuild", bad, o4.version, method="fw_merging"))
    with pytest.raises(ConfigError, match="task 'noise' has no calibration split.*") as err:
        rebuild_flow(saved.name)
    assert "nothing was registered" in str(err.value) and _versions(bad) == []
