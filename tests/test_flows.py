"""The pipeline as deployments on the REAL stack: schedule -> watch -> event -> fold -> register.

One served-deployments process (``mergeflow serve``) runs for the module against the
session stack (Prefect, MLflow, SeaweedFS S3). Checkpoints are a tiny MLP on sklearn's
digits (trained in a second), published to an S3 prefix the lineage watches.

Covered: the schedule triggers watch and an event triggers a fold (checked through the
runs' ``created_by``); a checkpoint that fails validation is rejected and does not block
the next one; the gate rejects a destructive fold and ``champion`` stays on the last
accepted version, which the next fold builds on; duplicate events fold once under the
lineage's concurrency limit; gc deletes only unreferenced prefixes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from helpers.cli import start_serve
from safetensors.torch import save_file

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.services, pytest.mark.slow]

WAIT_S = 240.0


# ----------------------------------------------------------------------------- suite
@dataclass(frozen=True)
class MlpSuite:
    """A base MLP and checkpoint folders (by id) plus per-task data (``{split}`` template)."""

    root: Path
    base: Path
    checkpoints: dict[str, Path]
    data: dict[str, str]


def _mlp_config(num_labels: int) -> dict[str, Any]:
    return {
        "mergeflow_architecture": "mlp",
        "in_features": 64,
        "hidden": [32],
        "num_labels": num_labels,
    }


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors")
    )
    return folder


def build_mlp_suite(root: Path) -> MlpSuite:
    """Base pretrained on digits; checkpoints ``t1``..``t4`` fine-tuned on label maps; ``bad``, ``noise``."""
    from sklearn.datasets import load_digits

    from mergeflow.evaluation.models import MLP

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    pre, train, val, test = perm[:600], perm[600:1200], perm[1200:1500], perm[1500:]
    base = MLP(_mlp_config(10))
    _train(base, x[pre], y[pre], 150, 0)
    backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    _save(root / "base", _mlp_config(10), backbone)
    labelings = {
        "t1": lambda t: t,
        "t2": lambda t: t % 2,
        "t3": lambda t: t % 3,
        "t4": lambda t: (t >= 5).long(),
    }
    checkpoints, data = {}, {}
    for i, (name, fn) in enumerate(labelings.items()):
        k = int(fn(y).max()) + 1
        m = MLP(_mlp_config(k))
        m.load_state_dict(
            {**backbone, **{n: v for n, v in m.state_dict().items() if n.startswith("classifier.")}}
        )
        _train(m, x[train], fn(y[train]), 60, i + 1)
        checkpoints[name] = _save(root / "checkpoints" / name, _mlp_config(k), m.state_dict())
        for split, idx in (("validation", val), ("test", test), ("calibration", train[:64])):
            (root / "data" / name).mkdir(parents=True, exist_ok=True)
            np.savez(
                root / "data" / name / f"{split}.npz", x=x[idx].numpy(), labels=fn(y[idx]).numpy()
            )
        data[name] = str(root / "data" / name / "{split}.npz")
    bad = {k: v.clone() for k, v in backbone.items()}
    bad["layers.0.weight"] = torch.zeros(32, 60)
    checkpoints["bad"] = _save(root / "checkpoints" / "bad", _mlp_config(10), bad)
    g = torch.Generator().manual_seed(7)
    noise = {k: v + 4.0 * torch.randn(v.shape, generator=g) for k, v in backbone.items()}
    noise.update(
        {n: v for n, v in MLP(_mlp_config(10)).state_dict().items() if n.startswith("classifier.")}
    )
    checkpoints["noise"] = _save(root / "checkpoints" / "noise", _mlp_config(10), noise)
    return MlpSuite(root, root / "base", checkpoints, data)


def lineage_spec(name: str, suite: MlpSuite, prefix: str, **overrides: Any) -> Any:
    """A task-arithmetic lineage over ``suite`` watching ``<prefix>/published`` every 5 s."""
    from mergeflow.evaluation.spec import EvaluationSuite, GateSpec, TaskSpec
    from mergeflow.lineage import LineageSpec

    tasks = tuple(TaskSpec(name=t, checkpoint=t, data=suite.data[t]) for t in suite.data)
    values: dict[str, Any] = {
        "name": name,
        "base": str(suite.base),
        "method": "task_arithmetic",
        "params": {"scale": 0.5},
        "sources": (f"{prefix}/published",),
        "evaluation": EvaluationSuite(tasks=tasks),
        "gate": GateSpec(min_acc=0.3, max_drop=0.25),
        "store": f"{prefix}/lineage",
        "device": "cpu",
        "schedule": 5,
        # the suite's "noise" checkpoint exercises the gate, not the task-vector screen
        "max_task_vector_ratio": None,
    }
    values.update(overrides)
    return LineageSpec(**values)


def publish(prefix: str, suite: MlpSuite, ck: str) -> None:
    """Upload a checkpoint folder to the watched S3 prefix (weights last)."""
    from mergeflow.storage.schemes import open_store

    dst = open_store(f"{prefix}/published/{ck}")
    folder = suite.checkpoints[ck]
    dst.put_file(folder / "config.json", "config.json")
    dst.put_file(folder / "model.safetensors", "model.safetensors")


def wait_for_version(model: str, ck: str, log: Path | None = None, timeout: float = WAIT_S) -> Any:
    """The version for checkpoint ``ck`` once registered and its lineage's fold runs are done.

    ``model`` is the registered model, which is the lineage name in these tests.
    """
    from mergeflow.flows.watch import active_fold_targets
    from mergeflow.services.process import log_tail
    from mergeflow.storage.registry import Registry

    reg = Registry()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(v.checkpoint_id == ck for v in reg.versions(model)):
            # the version exists; let the fold runs finish (aliases, lock release) and re-read
            while active_fold_targets(model) and time.monotonic() < deadline:
                time.sleep(0.5)
            return next(v for v in reg.versions(model) if v.checkpoint_id == ck)
        time.sleep(1.0)
    pytest.fail(
        f"no version for {ck} in {model} after {timeout:.0f}s\n{log_tail(log, 40) if log else ''}",
        pytrace=False,
    )


def flow_runs(flow_name: str, **params: Any) -> list[Any]:
    """Runs of a flow whose parameters include ``params``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), limit=200
        )
    return [r for r in runs if all((r.parameters or {}).get(k) == v for k, v in params.items())]


def assert_ticks_claimed_when_due(ticks: list[Any], poll_seconds: float) -> None:
    """Each tick that ran was claimed (PENDING, which takes the watch's one slot) at most one
    poll before it was due, and each cancelled tick was refused while another held the slot.

    With Prefect's 10 s prefetch a claimed tick held the slot 10 s before it started, and two
    of three 5 s ticks were cancelled; a tick that outlasts the interval under load may still
    drop the next one, which is what ``CANCEL_NEW`` is for.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        history = {r.id: client.read_flow_run_states(r.id) for r in ticks}
    held = []  # (id, claimed, released) of every tick that took the slot
    for r in ticks:
        pending = [s.timestamp for s in history[r.id] if s.type.value == "PENDING"]
        if not pending:
            continue
        early = (r.expected_start_time - pending[0]).total_seconds()
        assert early <= poll_seconds + 1.0, f"tick {r.name} claimed {early:.1f} s before it was due"
        done = [s.timestamp for s in history[r.id] if s.is_final()]
        held.append((r.id, pending[0], done[-1] if done else None))
    for r in ticks:
        if not (r.state_type and r.state_type.value == "CANCELLED") or not r.state:
            continue
        at = r.state.timestamp  # the server's; a release is stamped by its client, just before
        slack = timedelta(seconds=1)
        assert any(i != r.id and a <= at and (b is None or at <= b + slack) for i, a, b in held), (
            f"tick {r.name} was cancelled at {at} while no other tick held the watch's slot"
        )


@dataclass(frozen=True)
class Served:
    spec: Any
    suite: MlpSuite
    prefix: str
    log: Path
    running: RunningStack


@pytest.fixture(scope="module")
def mlp_suite(tmp_path_factory: pytest.TempPathFactory) -> MlpSuite:
    return build_mlp_suite(tmp_path_factory.mktemp("mlp-suite"))


@pytest.fixture(scope="module")
def served(stack: RunningStack, mlp_suite: MlpSuite) -> Iterator[Served]:
    """Lineage ``flows-<id>`` registered and ``mergeflow serve`` running for it."""
    from mergeflow.lineage import save_lineage

    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/tests-{tag}"
    spec = save_lineage(lineage_spec(f"flows-{tag}", mlp_suite, prefix))
    name = f"serve-{tag}"
    log = start_serve(stack.stack, name, [spec])
    try:
        yield Served(spec, mlp_suite, prefix, log, stack)
    finally:
        from mergeflow.flows.watch import active_fold_targets

        end = time.monotonic() + 60
        while active_fold_targets(spec.name) and time.monotonic() < end:  # let runs finish
            time.sleep(1.0)
        stack.stack.stop_process(name)


# ----------------------------------------------------------------------------- tests
def test_schedule_triggers_watch_and_the_event_triggers_a_fold(served: Served) -> None:
    from prefect.client.orchestration import get_client

    publish(served.prefix, served.suite, "t1")
    v = wait_for_version(served.spec.registered_model, "t1", served.log)
    assert v.status == "accepted" and v.step == 1 and v.parent_version is None
    assert {"champion", "newest"} <= set(v.aliases)
    assert v.model_uri.startswith(f"{served.prefix}/lineage/steps/0001-") and v.model_uri.endswith(
        "/model"
    )
    assert v.state_uri.startswith(f"{served.prefix}/lineage/steps/0001-") and v.state_uri.endswith(
        "/state"
    )
    assert 0.0 <= v.metrics["test/t1"] <= 1.0 and v.metrics["test/avg"] == pytest.approx(
        v.metrics["test/t1"]
    )
    ticks = flow_runs("mergeflow-watch", lineages=[served.spec.name])
    watch = [r for r in ticks if r.state_type and r.state_type.value == "COMPLETED"]
    assert_ticks_claimed_when_due(ticks, poll_seconds=1.0)
    assert watch and all(
        r.auto_scheduled and r.created_by and r.created_by.type == "SCHEDULE" for r in watch
    )
    folds = flow_runs("mergeflow-fold", lineage=served.spec.name, checkpoint_id="t1")
    assert folds and all(r.created_by and r.created_by.type == "AUTOMATION" for r in folds)
    with get_client(sync_client=True) as client:
        lock = client.read_global_concurrency_limit_by_name(served.spec.concurrency_name)
    assert lock.limit == 1 and lock.active_slots == 0


def test_a_rejected_checkpoint_does_not_block_later_ones(served: Served) -> None:
    publish(served.prefix, served.suite, "bad")
    publish(served.prefix, served.suite, "t2")
    bad = wait_for_version(served.spec.registered_model, "bad", served.log)
    good = wait_for_version(served.spec.registered_model, "t2", served.log)
    assert bad.status == "rejected" and "shape" in bad.reason and bad.model_uri == ""
    assert "champion" not in bad.aliases
    assert good.status == "accepted" and good.step == 2
    first = wait_for_version(served.spec.registered_model, "t1")
    assert good.parent_version == first.version
    assert int(bad.version) < int(good.version)  # publication order kept


def test_the_gate_keeps_champion_on_the_last_accepted_version(served: Served) -> None:
    from mergeflow.storage.registry import Registry

    reg = Registry()
    before = reg.champion(served.spec.registered_model)
    assert before is not None and before.checkpoint_id == "t2"
    publish(served.prefix, served.suite, "noise")
    noisy = wait_for_version(served.spec.registered_model, "noise", served.log)
    assert (
        noisy.status == "rejected" and "ACC" in noisy.reason and noisy.model_uri
    )  # gate, not validation
    assert reg.champion(served.spec.registered_model).version == before.version
    publish(served.prefix, served.suite, "t3")
    nxt = wait_for_version(served.spec.registered_model, "t3", served.log)
    assert nxt.status == "accepted"
    assert (
        nxt.parent_version == before.version
    )  # built on the last accepted state, not the rejected one
    assert nxt.step == before.step + 1
    assert reg.champion(served.spec.registered_model).version == nxt.version
    newest = reg.newest(served.spec.registered_model)
    assert newest is not None and newest.version == nxt.version and "test/bwt" in nxt.metrics


def test_duplicate_events_fold_once(
    served: Served, mlp_suite: MlpSuite, stack: RunningStack
) -> None:
    """A lineage nobody watches: two identical events -> two fold runs -> one fold."""
    from mergeflow.flows.events import emit_published
    from mergeflow.lineage import save_lineage
    from mergeflow.storage.schemes import open_source
    from mergeflow.tasks.values import CheckpointRef

    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/tests-{tag}"
    spec = save_lineage(lineage_spec(f"dup-{tag}", mlp_suite, prefix))
    publish(prefix, mlp_suite, "t1")
    (c,) = open_source(f"{prefix}/published").list()
    ck = CheckpointRef(
        id=c.id,
        uri=c.uri,
        digest=c.digest,
        published_at=c.published_at,
        source=f"{prefix}/published",
    )
    emit_published(spec.name, ck)
    emit_published(spec.name, ck)
    wait_for_version(spec.registered_model, "t1", served.log)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        runs = flow_runs("mergeflow-fold", lineage=spec.name)
        if len(runs) == 2 and all(r.state_type and r.state_type.value == "COMPLETED" for r in runs):
            break
        time.sleep(1.0)
    else:
        pytest.fail(
            f"expected 2 completed fold runs, got {[(r.name, r.state_type) for r in flow_runs('mergeflow-fold', lineage=spec.name)]}"
        )
    from mergeflow.storage.registry import Registry

    assert [v.checkpoint_id for v in Registry().versions(spec.registered_model)] == ["t1"]
    subflows = [r for r in flow_runs("mergeflow-fold-checkpoint") if r.name == f"{spec.name}-t1"]
    assert len(subflows) == 1  # the second run saw the registered version and skipped


def test_gc_deletes_only_unreferenced_prefixes(served: Served) -> None:
    from mergeflow.flows.maintenance import gc_flow
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_store

    root = open_store(served.spec.store)
    root.write_bytes("steps/9999-deadbeef/state/state.json", b"{}")
    assert gc_flow(served.spec.name, dry_run=True) == [f"{served.spec.store}/steps/9999-deadbeef"]
    assert root.exists("steps/9999-deadbeef/state/state.json")
    assert gc_flow(served.spec.name) == [f"{served.spec.store}/steps/9999-deadbeef"]
    assert not root.exists("steps/9999-deadbeef/state/state.json")
    for v in Registry().versions(served.spec.registered_model):
        if v.state_uri:
            assert open_store(v.state_uri).exists("state.json")
        if v.model_uri:
            assert open_store(v.model_uri).exists("model.safetensors")


def test_dask_fold_matches_the_sequential_fold(
    stack: RunningStack, model_files: Any, tmp_path: Path
) -> None:
    """Tensor groups folded on a local Dask cluster (worker processes, then threads) == the engine's fold."""
    from mergeflow.architecture import resolve_projection
    from mergeflow.flows.dask import dask_fold
    from mergeflow.lineage import DaskSpec, LineageSpec
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.tasks.values import CheckpointRef, ParentState

    base_path, cks = model_files(n=2, heads=True)
    base = open_checkpoint(str(base_path))
    info = engine.new_state(
        "opcm", {}, BaseRef(uri=base.uri, digest="-"), resolve_projection(base.reader, None), None
    )
    seq = LocalStore(tmp_path / "seq")
    states.init_state(seq, info)
    states.init_state(LocalStore(tmp_path / "d0" / "state"), info)
    for i, (ck, processes) in enumerate(zip(cks, (True, False), strict=True)):
        c = open_checkpoint(str(ck), base=base.reader)
        states.fold_into(seq, seq, base.reader, c, checkpoint_id=f"c{i}", digest=f"d{i}")
        spec = LineageSpec(
            name="dask",
            base=str(base_path),
            sources=(str(tmp_path),),
            store=str(tmp_path / "lineage"),
            dask=DaskSpec(groups=3, n_workers=2, processes=processes),
            device="cpu",
        )
        parent = ParentState(
            version=None, state_uri=str(tmp_path / f"d{i}" / "state"), step=i, params=info.params
        )
        ref = CheckpointRef(id=f"c{i}", uri=str(ck), digest=f"d{i}")
        out = dask_fold(spec, parent, ref, "main", dict(info.params), str(tmp_path / f"d{i + 1}"))
        assert out.step == i + 1 and out.folded == tuple(f"c{j}" for j in range(i + 1))
    d2 = LocalStore(tmp_path / "d2" / "state")
    (m1, r1), (m2, r2) = states.load_state(seq), states.load_state(d2)
    assert m2.info.step == 2 and [c.id for c in m2.info.checkpoints] == ["c0", "c1"]
    assert m2.info.scale == pytest.approx(m1.info.scale, rel=1e-12)
    assert r1 is not None and r2 is not None and sorted(r1.keys()) == sorted(r2.keys())
    for k in r1.keys():
        assert torch.equal(r1.get(k), r2.get(k)), k
    assert set(m2.heads) == {"c0", "c1"}
    assert torch.equal(
        states.heads_reader(d2, m2, "c1").get("head.weight"),
        open_checkpoint(str(cks[1])).reader.get("head.weight"),
    )


def test_dask_fold_of_a_method_with_extra_state_matches_the_sequential_fold(
    stack: RunningStack, tmp_path: Path
) -> None:
    """RegMean on Dask: statistics read by every group, the slots A and B committed with D, and
    the second fold continues them (== the engine's sequential fold)."""
    from helpers.models import finetune, tiny_state

    from mergeflow.architecture import resolve_projection
    from mergeflow.flows.dask import dask_fold
    from mergeflow.lineage import DaskSpec, LineageSpec
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef
    from mergeflow.merging.stats import stats_metadata
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.tasks.values import CheckpointRef, ParentState

    base_t = tiny_state(0)
    save_file(base_t, str(tmp_path / "base.safetensors"))
    base = open_checkpoint(str(tmp_path / "base.safetensors"))
    cks = []
    for i in range(2):
        d = tmp_path / f"ck{i}"
        d.mkdir()
        save_file(finetune(base_t, i), str(d / "model.safetensors"))
        g = torch.Generator().manual_seed(i)
        grams = {}
        for k, v in base_t.items():
            if v.dim() == 2 and "embed" not in k:
                x = torch.randn(32, v.shape[1], generator=g)
                grams[f"{k}:gram"] = x.T @ x / 32
        save_file(
            grams, str(d / "mergeflow_stats.safetensors"), metadata=stats_metadata(4, 32, "t")
        )
        cks.append(d)
    info = engine.new_state(
        "regmean", {}, BaseRef(uri=base.uri, digest="-"), resolve_projection(base.reader, None)
    )
    seq = LocalStore(tmp_path / "seq")
    states.init_state(seq, info)
    states.init_state(LocalStore(tmp_path / "d0" / "state"), info)
    spec = LineageSpec(
        name="dask-regmean",
        base=str(tmp_path / "base.safetensors"),
        method="regmean",
        sources=(str(tmp_path),),
        store=str(tmp_path / "lineage"),
        dask=DaskSpec(groups=3, n_workers=2, processes=False),
        device="cpu",
    )
    for i, ck in enumerate(cks):
        c = open_checkpoint(str(ck), base=base.reader)
        states.fold_into(seq, seq, base.reader, c, checkpoint_id=f"c{i}", digest=f"d{i}")
        parent = ParentState(
            version=None, state_uri=str(tmp_path / f"d{i}" / "state"), step=i, params=info.params
        )
        ref = CheckpointRef(id=f"c{i}", uri=str(ck), digest=f"d{i}")
        dask_fold(spec, parent, ref, "main", dict(info.params), str(tmp_path / f"d{i + 1}"))
    (_, r1), (m2, r2) = (
        states.load_state(seq),
        states.load_state(LocalStore(tmp_path / "d2" / "state")),
    )
    assert r1 is not None and r2 is not None and sorted(r1.keys()) == sorted(r2.keys())
    assert "layers.0.fc.weight:A" in r2.keys() and m2.info.step == 2
    for k in r1.keys():
        assert torch.allclose(r1.get(k), r2.get(k), rtol=0, atol=1e-6), k


def test_a_lineage_can_fold_on_dask(
    stack: RunningStack, mlp_suite: MlpSuite, tmp_path: Path
) -> None:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import DaskSpec, save_lineage

    tag = uuid.uuid4().hex[:6]
    spec = save_lineage(
        lineage_spec(
            f"dask-{tag}",
            mlp_suite,
            str(tmp_path / "lin"),
            sources=(str(mlp_suite.root / "checkpoints"),),
            dask=DaskSpec(n_workers=2, processes=False, groups=2),
        )
    )
    (out,) = backfill_flow(spec.name, [str(mlp_suite.checkpoints["t1"])])
    assert out.status == "accepted" and out.step == 1 and "test/t1" in out.metrics
    v = wait_for_version(spec.registered_model, "t1", timeout=10)
    assert v.model_uri.startswith(str(tmp_path / "lin" / "lineage" / "steps"))


def test_candidates_fold_from_the_same_parent_and_the_best_passing_one_wins(
    stack: RunningStack, mlp_suite: MlpSuite, tmp_path: Path
) -> None:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import CandidateSpec, save_lineage
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_store

    tag = uuid.uuid4().hex[:6]
    cands = (
        CandidateSpec(name="small", params={"scale": 0.1}),
        CandidateSpec(name="full", params={"scale": 1.0}),
    )
    spec = save_lineage(
        lineage_spec(
            f"cand-{tag}",
            mlp_suite,
            str(tmp_path / "lin"),
            sources=(str(mlp_suite.root / "checkpoints"),),
            candidates=cands,
        )
    )
    (out,) = backfill_flow(spec.name, [str(mlp_suite.checkpoints["t1"])])
    assert out.status == "accepted"
    second = out.metrics
    vals = {c: second[f"candidate/{c}/val/avg"] for c in ("small", "full")}
    winner = max(vals, key=lambda c: vals[c])
    assert second["val/avg"] == pytest.approx(
        vals[winner]
    )  # the reported fold is the best candidate
    v = wait_for_version(spec.registered_model, "t1", timeout=10)
    info = states.read_manifest(open_store(v.state_uri)).info
    assert info.params == {"scale": 1.0 if winner == "full" else 0.1}
    steps = {o.relpath.split("/")[1] for o in open_store(spec.store).list("steps")}
    assert len(steps) == 1  # the losing candidate's prefix is gone


def test_a_lineage_whose_watch_fails_does_not_stop_the_others(
    served: Served, mlp_suite: MlpSuite, stack: RunningStack
) -> None:
    """One watch run serves every lineage of a schedule: a broken one is reported by name,
    the others still emit, and the serve process folds what was emitted."""
    from mergeflow.errors import ConfigError, MergeflowError
    from mergeflow.flows.watch import watch_flow
    from mergeflow.lineage import save_lineage

    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/tests-{tag}"
    # not served by name: the shared fold deployment of the serve process folds its events
    spec = save_lineage(lineage_spec(f"watched-{tag}", mlp_suite, prefix, schedule="0 0 1 1 *"))
    publish(prefix, mlp_suite, "t1")
    with pytest.raises(ConfigError, match=f"no lineage named 'gone-{tag}'"):
        watch_flow([f"gone-{tag}", spec.name])
    v = wait_for_version(spec.registered_model, "t1", served.log)
    assert v.status == "accepted" and v.step == 1
    with pytest.raises(MergeflowError, match="watch failed for 2 lineages") as err:
        watch_flow([f"gone-{tag}", f"lost-{tag}"])
    assert f"gone-{tag}" in str(err.value) and f"lost-{tag}" in str(err.value)
