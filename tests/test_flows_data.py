"""Data-informed lineages on the REAL served stack: calibration data read, then fold, evaluation,
gate and registration, for learned coefficients (``adamerging``) and ``regmean``.

One ``mergeflow serve`` process runs both lineages over the digits MLP suite of
``test_flows`` (whose tasks carry a ``calibration`` split drawn from their training data).
RegMean computes each checkpoint's statistics from that split (no checkpoint publishes a
``mergeflow_stats.safetensors``) and caches them by digest; a task without calibration
data turns its checkpoint into a rejected version that says what is missing, and the next
checkpoint folds on the last accepted state.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
from helpers.cli import start_serve
from test_flows import MlpSuite, build_mlp_suite, lineage_spec, publish, wait_for_version

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> MlpSuite:
    return build_mlp_suite(tmp_path_factory.mktemp("mlp-data-suite"))


def test_adamerging_and_regmean_lineages_fold_end_to_end(
    stack: RunningStack, suite: MlpSuite
) -> None:
    from mergeflow.evaluation.spec import EvaluationSuite, GateSpec, TaskSpec
    from mergeflow.lineage import save_lineage
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_store

    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/data-{tag}"
    # t2's data has no calibration split: a method that needs it must reject t2, not fall back
    tasks = tuple(
        TaskSpec(
            name=t,
            checkpoint=t,
            data=(
                {s: suite.data[t].replace("{split}", s) for s in ("validation", "test")}
                if t == "t2"
                else suite.data[t]
            ),
        )
        for t in ("t1", "t2", "t3")
    )
    common = {"evaluation": EvaluationSuite(tasks=tasks), "gate": GateSpec()}
    ada = save_lineage(
        lineage_spec(
            f"ada-{tag}",
            suite,
            f"{prefix}/ada",
            method="adamerging",
            params={"steps": 10, "batch_size": 16},
            **common,
        )
    )
    reg = save_lineage(
        lineage_spec(
            f"reg-{tag}", suite, f"{prefix}/reg", method="regmean", params={"alpha": 0.9}, **common
        )
    )
    log = start_serve(stack.stack, f"serve-data-{tag}", [ada, reg])
    try:
        for ck in ("t1", "t2", "t3"):
            publish(f"{prefix}/ada", suite, ck)
            publish(f"{prefix}/reg", suite, ck)
        for spec in (ada, reg):
            v1 = wait_for_version(spec.registered_model, "t1", log)
            v2 = wait_for_version(spec.registered_model, "t2", log)
            v3 = wait_for_version(spec.registered_model, "t3", log)
            assert v1.status == "accepted", v1.reason
            assert v2.status == "rejected" and "task 't2' has no calibration" in v2.reason, (
                v2.reason
            )
            assert v3.status == "accepted" and v3.parent_version == v1.version, v3.reason
            assert v3.step == 2 and 0.0 <= v3.metrics["test/avg"] <= 1.0
            info = states.read_manifest(open_store(v3.state_uri)).info
            assert info.method == spec.method and [c.id for c in info.checkpoints] == ["t1", "t3"]
        # RegMean's statistics were computed from calibration data once per checkpoint and cached
        reg1 = wait_for_version(reg.registered_model, "t1")
        assert reg1.metrics["stats_seconds"] > 0
        cached = [o.relpath for o in open_store(reg.store).list("stats")]
        assert len(cached) == 2, cached  # t1 and t3 (t2 was refused before computing)
        st = open_store(reg1.state_uri)
        _, tensors = states.load_state(st)
        assert tensors is not None and "layers.0.weight:A" in tensors.keys()
    finally:
        stack.stack.stop_process(f"serve-data-{tag}")
