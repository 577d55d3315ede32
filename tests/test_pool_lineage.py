"""Pool lineages without the stack: the pool state on a store, its spec, its registry tags.

A lineage whose method is a pool method keeps one pool merge per version as a state
(``storage/pools.py``): D = θ̄ − θ₀ with scale 1, so its export is exactly ``mergeflow merge``'s
pool merge; it records the pool (with URIs) and every member's head, so the next checkpoint
merges with the same pool again. The flows on the served stack are in
``tests/test_flows_pool.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from test_pool_methods import _mlp_files

from mergeflow.errors import CheckpointError, ConfigError, StateError
from mergeflow.lineage import LineageSpec
from mergeflow.merging.tensors import DictWriter


class Pull:
    """Σ‖θ − (θ₀ + 0.05)‖²: pulls every merged tensor toward one shifted base (differentiable)."""

    tasks = ("toy",)

    def __init__(self, base: Mapping[str, torch.Tensor]) -> None:
        self.target = {k: v + 0.05 for k, v in base.items()}

    def __call__(self, tensors: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        return sum(((tensors[k] - self.target[k]) ** 2).sum() for k in tensors)


def _start(tmp_path: Path, method: str = "fw_merging") -> tuple:
    from mergeflow.architecture import resolve_projection, resolve_vocab
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint

    bd, cks, _ = _mlp_files(tmp_path)
    base = open_checkpoint(str(bd))
    init = LocalStore(tmp_path / "init")
    info = engine.new_state(
        method,
        {"max_iters": 3} if method == "fw_merging" else {"steps": 3},
        BaseRef(uri=base.uri, digest=base.digest()),
        resolve_projection(base.reader, base.config),
        vocab=resolve_vocab(base.reader, base.config),
    )
    states.init_state(init, info)
    opened = [open_checkpoint(str(c), base=base.reader) for c in cks]
    return base, opened, init


def _members(opened: list) -> list:
    from mergeflow.storage.pools import PoolMember

    return [PoolMember(f"ck{i}", o.digest(), o) for i, o in enumerate(opened)]


def _backbone(base) -> dict[str, torch.Tensor]:
    return {k: base.reader.get(k) for k in base.reader.keys()}


def test_a_pool_state_exports_the_pool_merge_and_merges_its_pool_again(tmp_path: Path) -> None:
    from mergeflow.merging.pool import pool_merge
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.pools import merge_pool_into

    base, opened, init = _start(tmp_path)
    members = _members(opened)
    objective = Pull(_backbone(base))
    one = LocalStore(tmp_path / "one")
    m1 = merge_pool_into(init, one, base, members, objective, params={"max_iters": 3})
    info = m1.info
    assert (info.method, info.step, info.scale) == ("fw_merging", 2, 1.0)
    assert [(c.id, c.step, c.uri) for c in info.checkpoints] == [
        ("ck0", 1, opened[0].uri),
        ("ck1", 2, opened[1].uri),
    ]
    assert set(m1.heads) == {"ck0", "ck1"}  # every member's head, for the evaluation
    for i, o in enumerate(opened):
        head = states.heads_reader(one, m1, f"ck{i}")
        assert head is not None and set(head.keys()) == {"classifier.weight", "classifier.bias"}
        assert torch.equal(head.get("classifier.weight"), o.reader.get("classifier.weight"))

    # θ₀ + D exported from the state is `mergeflow merge`'s pool merge, bit for bit
    exported, direct = DictWriter(), DictWriter()
    states.export_state(one, base.reader, exported)
    pool_merge(
        "fw_merging",
        {"max_iters": 3},
        base.reader,
        [o.reader for o in opened],
        direct,
        objective,
        log=None,
    )
    assert sorted(exported.tensors) == sorted(direct.tensors) == sorted(_backbone(base))
    for k, v in direct.tensors.items():
        assert torch.equal(exported.tensors[k], v), k

    # the next version merges the same pool again from the last one: heads it held are reused
    first = LocalStore(tmp_path / "first")
    merge_pool_into(init, first, base, members[:1], objective, params={"max_iters": 3})
    again = LocalStore(tmp_path / "again")
    m2 = merge_pool_into(first, again, base, members, objective, params={"max_iters": 3})
    parent = states.read_manifest(first)
    assert m2.heads["ck0"] == parent.heads["ck0"] and m2.heads["ck1"].startswith(again.uri)
    again_out = DictWriter()
    states.export_state(again, base.reader, again_out)
    for k, v in exported.tensors.items():  # the pool, not the path to it, decides the merge
        assert torch.equal(again_out.tensors[k], v), k


def test_a_pool_state_refuses_a_checkpoint_twice_and_a_diverging_merge_writes_nothing(
    tmp_path: Path,
) -> None:
    import math

    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.pools import merge_pool_into

    base, opened, init = _start(tmp_path, "batch_adamerging")
    members = _members(opened)
    dst = LocalStore(tmp_path / "dst")
    with pytest.raises(StateError, match="the pool holds a checkpoint twice"):
        merge_pool_into(init, dst, base, [members[0], members[0]], Pull(_backbone(base)), params={})

    class Diverging(Pull):
        def __call__(self, tensors, step):
            return super().__call__(tensors, step) * math.nan

    with pytest.raises(CheckpointError, match="loss became nan.*nothing was written"):
        merge_pool_into(init, dst, base, members, Diverging(_backbone(base)), params={})
    assert not states.has_state(dst) and list(dst.list("")) == []


def test_a_pool_lineage_spec_takes_a_pool_method_and_refuses_what_it_cannot_do() -> None:
    text = "name: p\nbase: /m\nsources: [/src]\nstore: /st\nmethod: fw_merging\n"
    spec = LineageSpec.from_yaml_text(text + "params: {max_iters: 2}\n")
    assert spec.method_kind == "pool" and spec.candidate_folds()[0].method == "fw_merging"
    assert LineageSpec.from_yaml_text(text.replace("fw_merging", "opcm")).method_kind == "continual"
    for extra, word in (
        ("candidates: [{method: opcm}]\n", "candidates"),
        ("dask: {n_workers: 2}\n", "dask"),
        ("vocab: union\n", "vocab: union"),
    ):
        with pytest.raises(ConfigError, match=f"'fw_merging' merges a pool and takes no {word}"):
            LineageSpec.from_yaml_text(text + extra, "x.yaml")
    with pytest.raises(ConfigError, match="invalid parameters for method 'fw_merging'"):
        LineageSpec.from_yaml_text(text + "params: {steps: 2}\n", "x.yaml")
    with pytest.raises(ConfigError, match="batch method"):
        LineageSpec.from_yaml_text(text.replace("fw_merging", "batch_ties"), "x.yaml")


def test_a_pool_version_records_its_pool_in_one_tag() -> None:
    from mergeflow.storage.registry.records import (
        _MAX_TAG,
        FoldRecord,
        PoolMember,
        parse_pool,
        pool_tag,
        run_params,
        version_tags,
    )
    from mergeflow.storage.registry.render import describe
    from mergeflow.storage.registry.tags import T_POOL

    pool = [PoolMember(id=f"t{i}", uri=f"s3://b/ck/t{i}", digest=f"sha256:{i}") for i in range(3)]
    rec = FoldRecord(
        lineage="p",
        registered_model="p",
        step=3,
        checkpoint_id="t2",
        checkpoint_uri="s3://b/ck/t2",
        checkpoint_digest="sha256:2",
        parent_version=None,
        method="batch_adamerging",
        params={"steps": 5},
        base_uri="s3://b/base",
        state_uri="s3://b/p/steps/0003-ab/state",
        model_uri="s3://b/p/steps/0003-ab/model",
        status="accepted",
        pool=pool,
    )
    tags = version_tags(rec, "m-1")
    assert parse_pool(tags[T_POOL]) == pool
    assert run_params(rec)["pool"] == "t0,t1,t2"
    assert "| pool | batch_adamerging merge of 3 checkpoint(s): `t0`, `t1`, `t2` |" in describe(rec)
    big = [
        PoolMember(id=f"t{i}", uri="s3://" + "x" * 80, digest="sha256:" + "d" * 64)
        for i in range(60)
    ]
    text = pool_tag(big)
    assert len(text) <= _MAX_TAG and [m.id for m in parse_pool(text)] == [m.id for m in big]
    assert parse_pool("") == [] and parse_pool("{broken") == []


def test_seen_and_held_checkpoints_include_a_pool_versions_members() -> None:
    from mergeflow.storage.registry import PoolMember, VersionRecord
    from mergeflow.storage.registry.history import inherited_seen

    v = VersionRecord(
        version="1",
        step=2,
        status="accepted",
        checkpoint_id="t3",
        checkpoint_digest="sha256:3",
        parent_version=None,
        state_uri="s3://b/s",
        model_uri="s3://b/m",
        metrics={},
        run_id=None,
        aliases=[],
        pool=[PoolMember(id="t1", digest="sha256:1"), PoolMember(id="t3", digest="sha256:3")],
    )
    assert v.held() == {"t1", "sha256:1", "t3", "sha256:3"}
    assert inherited_seen([v], "1") == v.held() and inherited_seen([v], "0") == set()


def test_a_pool_merges_objective_options_come_from_the_method() -> None:
    from mergeflow.merging.methods import get_pool, validate_params
    from mergeflow.merging.methods.base import ObjectiveOptions

    fw, ada = get_pool("fw_merging"), get_pool("batch_adamerging")
    assert fw.objective_options(validate_params(fw, {"examples": 7})) == ObjectiveOptions(
        batch_size=7, seed=0, loss="cross_entropy"
    )
    p = validate_params(ada, {"batch_size": 5, "seed": 3, "loss": "entropy"})
    assert ada.objective_options(p) == ObjectiveOptions(batch_size=5, seed=3, loss="entropy")
