"""Editing a lineage's history on the REAL stack: drop + replay (and a crash mid-replay), branch, rebuild.

Lineages fold the tiny digits MLP checkpoints of ``test_flows`` with OPCM from a local
folder into a local store, in-process (``backfill_flow``), against the session stack
(Prefect, MLflow, SeaweedFS). The drop itself runs as the CLI in a subprocess that is killed
once its first replayed fold is registered; ``lineage resume`` then finishes it. Pure
helpers (the drop plan, checkpoint lookup, derived specs) have unit tests at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from test_flows import MlpSuite, build_mlp_suite, lineage_spec

from mergeflow.errors import ConfigError

if TYPE_CHECKING:
    from fixtures_stack import RunningStack
    from helpers.cli import Result

    from mergeflow.lineage import LineageSpec

NEVER = "0 0 1 1 *"  # no watch runs during a test (nothing serves these lineages anyway)


@dataclass(frozen=True)
class Lineages:
    suite: MlpSuite
    ref: Any
    """OPCM over t1, t3, t4: the lineage that never saw t2."""
    root: Path


def _spec(name: str, suite: MlpSuite, root: Path, **kw: Any) -> LineageSpec:
    from mergeflow.evaluation.spec import GateSpec

    values: dict[str, Any] = {
        "method": "opcm",
        "params": {"alpha": 0.5},
        "sources": (str(suite.root / "checkpoints"),),
        "gate": GateSpec(),  # accept every fold: the test is about history, not the gate
        "schedule": NEVER,
        **kw,
    }
    return lineage_spec(name, suite, str(root / name), **values)


def _uris(suite: MlpSuite, *names: str) -> list[str]:
    return [str(suite.checkpoints[n]) for n in names]


def _tensors(uri: str) -> dict[str, torch.Tensor]:
    from mergeflow.storage.schemes import open_checkpoint

    r = open_checkpoint(uri).reader
    return {k: r.get(k) for k in r.keys()}


def _state(uri: str) -> tuple[Any, dict[str, torch.Tensor]]:
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_store

    m, reader = states.load_state(open_store(uri))
    assert reader is not None
    return m.info, {k: reader.get(k) for k in reader.keys()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k  # bit for bit


def _versions(spec: Any) -> list[Any]:
    from mergeflow.storage.registry import Registry

    return Registry().versions(spec.registered_model)


@pytest.fixture(scope="module")
def lineages(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Lineages:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import save_lineage

    root = tmp_path_factory.mktemp("lineage-ops")
    suite = build_mlp_suite(root / "suite")
    ref = save_lineage(_spec(f"ref-{uuid.uuid4().hex[:6]}", suite, root))
    outs = backfill_flow(ref.name, _uris(suite, "t1", "t3", "t4"))
    assert [o.status for o in outs] == ["accepted"] * 3
    return Lineages(suite, ref, root)


# ----------------------------------------------------------------------------- drop
@pytest.mark.services
@pytest.mark.slow
def test_drop_replays_to_bit_identical_tensors_and_resumes_after_a_crash(
    lineages: Lineages, stack: RunningStack, cli: Callable[..., Result]
) -> None:
    from mergeflow.flows.fold import backfill_flow, pending_checkpoints
    from mergeflow.lineage import save_lineage
    from mergeflow.storage.registry import Registry
    from mergeflow.tasks.lineage import seen_checkpoints
    from mergeflow.tasks.replay import rebuild_queue

    suite = lineages.suite
    spec = save_lineage(_spec(f"drop-{uuid.uuid4().hex[:6]}", suite, lineages.root))
    outs = backfill_flow(spec.name, _uris(suite, "t1", "t2", "t3", "t4"))
    assert [o.status for o in outs] == ["accepted"] * 4
    before = {v.checkpoint_id: v for v in _versions(spec)}

    # bad input first: an unknown checkpoint changes nothing
    r = cli("lineage", "drop", spec.name, "nope", "--reason", "typo")
    assert r.returncode == 2 and "no version holds checkpoint 'nope'" in r.stderr
    assert "t1, t2, t3, t4" in r.stderr
    assert _versions(spec) == list(before.values())

    # the drop, killed once its first replayed fold is registered
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeflow", "lineage", "drop", spec.name, "t2"]
        + ["--reason", "trained on leaked test data"],
        env={**os.environ, **stack.full_env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(v.replaces for v in _versions(spec)):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    mid = {v.version: v for v in _versions(spec)}
    assert mid[before["t2"].version].status == "dropped"
    pending = [v for v in mid.values() if v.status == "superseded" and not v.superseded_by]
    assert pending, "the drop finished before it could be interrupted"
    assert mid[before["t2"].version].dropped_reason == "trained on leaked test data"

    # while the replay is unfinished, new folds are refused (order would change)
    with pytest.raises(Exception, match="replay after a dropped checkpoint is unfinished"):
        backfill_flow(spec.name, _uris(suite, "noise"))
    assert "noise" not in {v.checkpoint_id for v in _versions(spec)}

    # resume (the killed run's lock is broken: its process is gone)
    r = cli("lineage", "resume", spec.name)
    assert r.returncode == 0, r.stderr
    assert "champion: version" in r.stdout

    after = {v.version: v for v in _versions(spec)}
    live = [v for v in after.values() if v.status in ("accepted", "rejected")]
    assert [v.checkpoint_id for v in live] == ["t1", "t3", "t4"]
    for ck in ("t3", "t4"):
        old = after[before[ck].version]
        assert old.status == "superseded" and old.superseded_by
        new = after[old.superseded_by]
        assert new.replaces == old.version and new.checkpoint_digest == old.checkpoint_digest
        assert [v.replaces for v in after.values()].count(old.version) == 1  # no duplicate
        assert "replayed without t2" in old.superseded_reason
    t3_new = after[after[before["t3"].version].superseded_by]
    assert t3_new.parent_version == before["t1"].version and t3_new.step == 2
    champion = Registry().champion(spec.registered_model)
    ref_champion = Registry().champion(lineages.ref.registered_model)
    assert champion is not None and ref_champion is not None
    assert champion.version == after[before["t4"].version].superseded_by

    # bit-identical to the lineage that never saw t2: state, scale and merged weights
    info, tensors = _state(champion.state_uri)
    ref_info, ref_tensors = _state(ref_champion.state_uri)
    assert [c.id for c in info.checkpoints] == ["t1", "t3", "t4"]
    assert info.scale == ref_info.scale and info.scalars == ref_info.scalars
    _same(tensors, ref_tensors)
    _same(_tensors(champion.model_uri), _tensors(ref_champion.model_uri))

    # the dropped checkpoint is never offered again; the next fold works
    pending_ids = [c.id for c in pending_checkpoints(spec, seen_checkpoints(spec))]
    assert "t2" not in pending_ids and "noise" in pending_ids
    rebuilt = spec.model_copy(
        update={"registered_model": f"{spec.name}-x", "origin": _origin(spec)}
    )
    assert [c.id for c in rebuild_queue.fn(rebuilt)] == ["t1", "t3", "t4"]  # t2 stays out

    # dropping it again only reports it; the history reads in `lineage show`
    r = cli("lineage", "drop", spec.name, "t2", "--reason", "again")
    assert r.returncode == 0 and "replayed 0 fold(s)" in r.stdout
    assert _versions(spec) == list(after.values())
    r = cli("lineage", "show", spec.name)
    assert r.returncode == 0, r.stderr
    assert f"version {before['t2'].version} (t2): dropped: trained on leaked test data" in r.stdout
    assert f"superseded by version {champion.version}: replayed without t2" in r.stdout


def _origin(spec: Any) -> Any:
    from mergeflow.lineage import LineageOrigin

    newest = str(max(int(v.version) for v in _versions(spec)))
    return LineageOrigin(
        kind="rebuild", lineage=spec.name, registered_model=spec.registered_model, version=newest
    )


# --------------------------------------------------------------------------- branch
@pytest.mark.services
@pytest.mark.slow
def test_branch_continues_a_version_and_leaves_the_original_untouched(
    lineages: Lineages, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from mergeflow.flows.fold import backfill_flow, pending_checkpoints
    from mergeflow.lineage import find_lineage, load_lineage
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint, open_store
    from mergeflow.tasks.lineage import seen_checkpoints

    ref = lineages.ref
    versions = _versions(ref)
    files = sorted(o.relpath for o in open_store(ref.store).list(""))
    at = next(v for v in versions if v.checkpoint_id == "t3")
    new = f"branch-{uuid.uuid4().hex[:6]}"
    store = f"{ref.store.rpartition('/')[0]}/{new}"  # beside the original's store

    # a change of method is refused, and nothing is created
    r = cli("lineage", "branch", ref.name, "--at", at.version, "--as", new, "--method", "ties")
    assert r.returncode == 2
    assert "one method's state does not continue another's" in r.stderr
    assert f"mergeflow lineage rebuild {ref.name} --as {new} --method ties" in r.stderr
    r = cli("lineage", "branch", ref.name, "--at", "99", "--as", new)
    assert r.returncode == 2 and "no version '99'" in r.stderr
    assert find_lineage(new) is None and not Path(store).exists()

    r = cli("lineage", "branch", ref.name, "--at", at.version, "--as", new, "--param", "alpha=0.3")
    assert r.returncode == 0, r.stderr
    spec = load_lineage(new)
    assert spec.params == {"alpha": 0.3} and spec.method == "opcm"
    assert spec.origin is not None and spec.origin.version == at.version
    assert spec.store == store
    pending = [c.id for c in pending_checkpoints(spec, seen_checkpoints(spec))]
    assert "t1" not in pending and "t3" not in pending and "t4" in pending

    (out,) = backfill_flow(new, _uris(lineages.suite, "t4"))
    assert out.status == "accepted" and out.step == 3
    (v,) = _versions(spec)
    info, tensors = _state(v.state_uri)
    assert [c.id for c in info.checkpoints] == ["t1", "t3", "t4"] and info.params == {"alpha": 0.3}

    # the same fold by hand: t4 into t3's state with alpha=0.3
    manual = LocalStore(tmp_path / "manual")
    states.with_params(open_store(at.state_uri), manual, {"alpha": 0.3})
    base = open_checkpoint(str(lineages.suite.base))
    ck = open_checkpoint(str(lineages.suite.checkpoints["t4"]), base=base.reader)
    states.fold_into(manual, manual, base.reader, ck, checkpoint_id="t4", device="cpu")
    _same(tensors, _state(str(tmp_path / "manual"))[1])

    # the original lineage: same versions, tags and aliases; same files on its store
    assert _versions(ref) == versions
    assert sorted(o.relpath for o in open_store(ref.store).list("")) == files


# -------------------------------------------------------------------------- rebuild
@pytest.mark.services
@pytest.mark.slow
def test_rebuild_refolds_the_same_checkpoints_with_another_method(
    lineages: Lineages, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from mergeflow.architecture import resolve_projection
    from mergeflow.lineage import find_lineage
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint

    ref = lineages.ref
    new = f"rebuild-{uuid.uuid4().hex[:6]}"
    r = cli("lineage", "rebuild", ref.name, "--as", new, "--method", "ties", "--param", "k=1")
    assert r.returncode == 2 and "invalid parameters for method 'ties'" in r.stderr
    assert find_lineage(new) is None
    r = cli("lineage", "rebuild", ref.name, "--as", new, "--method", "task_arithmetic")
    assert r.returncode == 0, r.stderr
    vs = _versions(ref.model_copy(update={"registered_model": new}))
    assert [(v.checkpoint_id, v.status, v.method) for v in vs] == [
        (c, "accepted", "task_arithmetic") for c in ("t1", "t3", "t4")
    ]

    # the same three folds by hand
    base = open_checkpoint(str(lineages.suite.base))
    st = LocalStore(tmp_path / "manual")
    projection = resolve_projection(base.reader, base.config)
    info = engine.new_state("task_arithmetic", {}, BaseRef(uri=base.uri, digest="-"), projection)
    states.init_state(st, info)
    for name in ("t1", "t3", "t4"):
        ck = open_checkpoint(str(lineages.suite.checkpoints[name]), base=base.reader)
        states.fold_into(st, st, base.reader, ck, checkpoint_id=name, device="cpu")
    _same(_state(vs[-1].state_uri)[1], _state(str(tmp_path / "manual"))[1])

    r = cli("lineage", "rebuild", ref.name, "--as", new, "--method", "task_arithmetic")
    assert r.returncode == 0 and "0 fold(s)" in r.stdout  # resumable: nothing left to do


@pytest.mark.parametrize(
    ("method", "params"), [("regmean", []), ("adamerging", ["--param", "steps=5"])]
)
def test_rebuild_turns_a_lineage_into_a_data_informed_one(
    lineages: Lineages, cli: Callable[..., Result], method: str, params: list[str]
) -> None:
    """Statistics (regmean) and the objective (adamerging) come from the tasks' calibration split."""
    new = f"rebuild-{method}-{uuid.uuid4().hex[:6]}"
    r = cli("lineage", "rebuild", lineages.ref.name, "--as", new, "--method", method, *params)
    assert r.returncode == 0, r.stderr
    vs = _versions(lineages.ref.model_copy(update={"registered_model": new}))
    assert [(v.checkpoint_id, v.status, v.method) for v in vs] == [
        (c, "accepted", method) for c in ("t1", "t3", "t4")
    ]
    assert all(0.0 <= v.metrics["test/avg"] <= 1.0 for v in vs)


# ------------------------------------------------------------------------- portfolio
PORTFOLIO = ({"method": "opcm"}, {"method": "task_arithmetic", "params": {"scale": 0.3}})


@pytest.fixture(scope="module")
def portfolio(lineages: Lineages) -> Any:
    """A portfolio lineage (OPCM and task arithmetic, each its own state chain) over t1, t3, t4."""
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import save_lineage

    spec = _spec(f"folio-{uuid.uuid4().hex[:6]}", lineages.suite, lineages.root)
    spec = save_lineage(spec.model_copy(update={"candidates": _candidates()}))
    outs = backfill_flow(spec.name, _uris(lineages.suite, "t1", "t3", "t4"))
    assert [o.status for o in outs] == ["accepted"] * 3
    return spec


def _candidates() -> tuple[Any, ...]:
    from mergeflow.lineage import CandidateSpec

    return tuple(CandidateSpec(**c) for c in PORTFOLIO)


def _chains(v: Any) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """Method -> (state info, tensors) of every state chain a version kept."""
    assert len(v.candidates) == 2 and all(c.state_uri for c in v.candidates)
    return {c.method: _state(c.state_uri) for c in v.candidates}


def _refold(suite: MlpSuite, state_uri: str, ck: str, out: Path) -> dict[str, torch.Tensor]:
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint, open_store

    base = open_checkpoint(str(suite.base))
    c = open_checkpoint(str(suite.checkpoints[ck]), base=base.reader)
    states.fold_into(open_store(state_uri), LocalStore(out), base.reader, c, checkpoint_id=ck)
    return _state(str(out))[1]


@pytest.mark.services
@pytest.mark.slow
def test_drop_in_a_portfolio_replays_every_chain_bit_for_bit(
    lineages: Lineages, portfolio: Any
) -> None:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.flows.replay import replay_flow
    from mergeflow.lineage import save_lineage
    from mergeflow.storage.registry import Registry

    suite = lineages.suite
    spec = _spec(f"folio-drop-{uuid.uuid4().hex[:6]}", suite, lineages.root)
    spec = save_lineage(spec.model_copy(update={"candidates": _candidates()}))
    outs = backfill_flow(spec.name, _uris(suite, "t1", "t2", "t3", "t4"))
    assert [o.status for o in outs] == ["accepted"] * 4
    before = {v.checkpoint_id: v for v in _versions(spec)}

    steps = replay_flow(spec.name, "t2", "trained on leaked test data")
    assert [(s.replaced, s.outcome.status) for s in steps] == [
        (before["t3"].version, "accepted"),
        (before["t4"].version, "accepted"),
    ]
    after = {v.version: v for v in _versions(spec)}
    t3 = after[after[before["t3"].version].superseded_by or ""]
    assert t3.parent_version == before["t1"].version
    assert {m: [c.id for c in i.checkpoints] for m, (i, _) in _chains(t3).items()} == {
        "opcm": ["t1", "t3"],
        "task_arithmetic": ["t1", "t3"],
    }
    # every chain equals, bit for bit, the portfolio that never saw t2
    champion = Registry().champion(spec.registered_model)
    ref = Registry().champion(portfolio.registered_model)
    assert champion is not None and ref is not None
    assert champion.checkpoint_id == "t4" and champion.method == ref.method
    mine, theirs = _chains(champion), _chains(ref)
    for method in ("opcm", "task_arithmetic"):
        assert [c.id for c in mine[method][0].checkpoints] == ["t1", "t3", "t4"]
        assert mine[method][0].scale == theirs[method][0].scale
        _same(mine[method][1], theirs[method][1])
    _same(_tensors(champion.model_uri), _tensors(ref.model_uri))


@pytest.mark.services
@pytest.mark.slow
def test_branch_of_a_portfolio_continues_every_chain(
    lineages: Lineages, portfolio: Any, cli: Callable[..., Result], tmp_path: Path
) -> None:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import load_lineage
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_store
    from mergeflow.tasks import layout

    versions = _versions(portfolio)
    at = next(v for v in versions if v.checkpoint_id == "t3")
    new = f"folio-branch-{uuid.uuid4().hex[:6]}"
    r = cli("lineage", "branch", portfolio.name, "--at", at.version, "--as", new)
    assert r.returncode == 0, r.stderr
    spec = load_lineage(new)
    assert spec.candidates == portfolio.candidates and spec.chain_methods() == [
        "opcm",
        "task_arithmetic",
    ]
    held = at.chains()
    for method in spec.chain_methods():  # each chain starts at the version's state of its method
        init = states.read_manifest(open_store(layout.init_state_uri(spec, method)))
        assert init.tensors == states.read_manifest(open_store(held[method])).tensors

    (out,) = backfill_flow(new, _uris(lineages.suite, "t4"))
    assert out.status == "accepted" and out.step == 3
    (v,) = _versions(spec)
    for method, (info, tensors) in _chains(v).items():
        assert [c.id for c in info.checkpoints] == ["t1", "t3", "t4"] and info.method == method
        _same(tensors, _refold(lineages.suite, held[method], "t4", tmp_path / method))
    assert _versions(portfolio) == versions  # the original is untouched


@pytest.mark.services
@pytest.mark.slow
def test_rebuild_of_a_portfolio_refolds_with_one_method(
    lineages: Lineages, portfolio: Any, cli: Callable[..., Result]
) -> None:
    new = f"folio-rebuild-{uuid.uuid4().hex[:6]}"
    r = cli("lineage", "rebuild", portfolio.name, "--as", new, "--method", "weight_average")
    assert r.returncode == 0, r.stderr
    vs = _versions(portfolio.model_copy(update={"registered_model": new}))
    assert [(v.checkpoint_id, v.status, v.method, v.candidates) for v in vs] == [
        (c, "accepted", "weight_average", []) for c in ("t1", "t3", "t4")
    ]


# ----------------------------------------------------------------------------- unit
def _v(version: str, ck: str, status: str = "accepted", **kw: Any) -> Any:
    from mergeflow.storage.registry import VersionRecord

    values: dict[str, Any] = {
        "version": version,
        "step": int(version),
        "status": status,
        "checkpoint_id": ck,
        "checkpoint_digest": f"sha256:{ck}",
        "parent_version": None,
        "state_uri": f"s3://b/steps/{version}/state",
        "model_uri": f"s3://b/steps/{version}/model",
        "metrics": {},
        "run_id": None,
        "aliases": [],
        **kw,
    }
    return VersionRecord(**values)


def test_plan_drop_replays_only_what_built_on_an_accepted_version() -> None:
    from mergeflow.storage.registry import history

    vs = [
        _v("1", "a"),
        _v("2", "b"),
        _v("3", "c", "rejected"),
        _v("4", "bad", "rejected", state_uri="", model_uri=""),
        _v("5", "d"),
    ]
    assert [v.version for v in history.plan_drop(vs, vs[1])] == ["3", "5"]
    assert history.plan_drop(vs, vs[2]) == []  # nothing built on a rejected fold
    assert history.find_checkpoint(vs, "sha256:c").version == "3"
    assert history.find_checkpoint(vs, "c").version == "3"
    with pytest.raises(
        ConfigError, match="no version holds checkpoint 'x'.*known: a, b, c, bad, d"
    ):
        history.find_checkpoint(vs, "x")
    edited = [
        _v("2", "b", "dropped", dropped_reason="leak"),
        _v("3", "c", "superseded", superseded_reason="why"),
        _v("5", "d", "superseded", superseded_by="6"),
        _v("6", "d", replaces="5"),
    ]
    assert [v.version for v in history.pending_replays(edited)] == ["3"]
    assert history.replacement_of(edited, "5").version == "6"
    assert history.find_checkpoint(edited, "d").version == "6"  # the live one
    assert history.find_checkpoint(edited, "b").status == "dropped"
    assert [v.note for v in edited] == [
        "dropped: leak",
        "superseded replay pending: why",
        "superseded by version 6: ",
        "replaces version 5",
    ]
    assert history.inherited_seen(vs, "2") == {"a", "b", "sha256:a", "sha256:b"}


def test_derived_specs_keep_the_method_of_a_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergeflow.lineage import LineageSpec, derive_lineage

    origin = LineageSpec(
        name="orig", base="/m/base", sources=("/src",), store="s3://b/lineages/orig", params={}
    )
    monkeypatch.setattr("mergeflow.lineage.find_lineage", lambda name: None)  # no catalog here
    with pytest.raises(ConfigError, match="one method's state does not continue another's"):
        derive_lineage(origin, "branch", "new", "2", method="ties")
    b = derive_lineage(origin, "branch", "new", "2", params={"alpha": 0.2})
    assert (b.method, b.params, b.store, b.registered_model) == (
        "opcm",
        {"alpha": 0.2},
        "s3://b/lineages/new",
        "new",
    )
    assert b.origin is not None and (b.origin.kind, b.origin.version) == ("branch", "2")
    r = derive_lineage(origin, "rebuild", "re", "5", method="ties", sources=("/other",))
    assert (r.method, r.params, r.sources) == ("ties", {}, ("/other",))
    with pytest.raises(ConfigError, match="alpha"):
        derive_lineage(origin, "branch", "new", "2", params={"alpha": 2.0})
    with pytest.raises(ConfigError, match="its own --store"):
        derive_lineage(origin, "branch", "new", "2", store="s3://b/lineages/orig")


def test_a_drop_needs_a_reason() -> None:
    from mergeflow.lineage import LineageSpec
    from mergeflow.tasks.replay import drop_checkpoint

    spec = LineageSpec(name="x", base="/m/base", sources=("/src",), store="/tmp/never-written")
    with pytest.raises(ConfigError, match=r"say why the checkpoint is dropped \(--reason TEXT\)"):
        drop_checkpoint.fn(spec, "t2", "   ")  # refused before the registry is read
