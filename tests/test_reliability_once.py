"""Exactly once, in publication order, on the REAL stack (Prefect server, MLflow, S3).

- a burst of checkpoints with every fold started twice, concurrently and out of order,
  plus overlapping watch runs: each checkpoint is folded once, in publication order, and
  every version builds on the one before (CI: 6 checkpoints in threads of this process;
  ``reliability``: 20 through ``mergeflow serve`` with every event duplicated);
- a checkpoint published while a fold runs is folded after it, on top of it;
- the compare-and-set that MLflow lacks: a fold whose parent moved is refused at commit
  (``LineageMoved``), and a holder whose lease was revoked cannot commit (``LockLost``).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers.cli import start_serve
from helpers.models import finetune, tiny_state
from safetensors.torch import save_file

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.services]  # the reliability test below runs only with -m reliability


def publish_burst(pub: Path, n: int, start: int = 0) -> list[str]:
    """``n`` fine-tunes of the tiny base as folders ``c00``…, mtimes one second apart."""
    base = tiny_state(0)
    t0 = time.time() - 1000 + start
    ids = []
    for i in range(start, start + n):
        d = pub / f"c{i:02d}"
        d.mkdir(parents=True)
        save_file(finetune(base, i), str(d / "model.safetensors"))
        os.utime(d / "model.safetensors", (t0 + i, t0 + i))
        ids.append(d.name)
    return ids


def make_lineage(root: Path, name: str, store: str | None = None, schedule: int = 5) -> Any:
    from mergeflow.lineage import LineageSpec, save_lineage

    root.mkdir(parents=True, exist_ok=True)
    save_file(tiny_state(0), str(root / "base.safetensors"))
    (root / "pub").mkdir(exist_ok=True)
    return save_lineage(
        LineageSpec(
            name=name,
            base=str(root / "base.safetensors"),
            method="task_arithmetic",
            sources=(str(root / "pub"),),
            store=store or str(root / "lineage"),
            device="cpu",
            schedule=schedule,
        )
    )


def assert_chain(model: str, ids: list[str]) -> list[Any]:
    """One version per checkpoint, in publication order, each built on the one before."""
    from mergeflow.storage.registry import Registry

    versions = sorted(Registry().versions(model), key=lambda v: int(v.version))
    assert [v.checkpoint_id for v in versions] == ids, [v.checkpoint_id for v in versions]
    parent = None
    for i, v in enumerate(versions):
        assert v.status == "accepted" and v.step == i + 1, v
        assert v.parent_version == parent, (v.version, v.parent_version, parent)
        parent = v.version
    assert "newest" in versions[-1].aliases and "champion" in versions[-1].aliases
    return versions


def run_all(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads at once; re-raise the first error."""
    out: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    if errors:
        raise errors[0]
    return out


@pytest.mark.slow
def test_duplicate_and_overlapping_fold_runs_fold_each_checkpoint_once_in_order(
    stack: RunningStack, tmp_path: Path
) -> None:
    from mergeflow.flows.fold import fold_flow
    from mergeflow.flows.watch import watch_flow

    spec = make_lineage(tmp_path, f"once-{uuid.uuid4().hex[:6]}")
    ids = publish_burst(tmp_path / "pub", 6)
    targets = ids + ids  # every checkpoint twice ...
    random.Random(0).shuffle(targets)  # ... in no particular order
    calls: list[Callable[[], Any]] = [
        (lambda c=c: fold_flow(spec.name, checkpoint_id=c)) for c in targets[:8]
    ]
    calls += [lambda: watch_flow([spec.name]), lambda: watch_flow([spec.name])]  # overlapping
    t0 = time.monotonic()
    outcomes = run_all(calls)
    for c in targets[8:]:  # the rest after, as late duplicates
        outcomes.append(fold_flow(spec.name, checkpoint_id=c))
    elapsed = time.monotonic() - t0
    assert_chain(spec.registered_model, ids)
    folded = [o for out in outcomes[:8] + outcomes[10:] for o in out if o.status != "skipped"]
    assert sorted(o.checkpoint_id for o in folded) == ids  # each folded by exactly one run
    print(
        f"RELIABILITY exactly-once: {len(ids)} checkpoints, {len(targets)} fold runs "
        f"(8 concurrent) + 2 overlapping watch runs: {len(ids)} versions in order, "
        f"{len(targets) - len(ids)} duplicates absorbed, {elapsed:.1f} s"
    )


@pytest.mark.slow
def test_a_checkpoint_published_while_a_fold_runs_is_folded_after_it(
    stack: RunningStack, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from mergeflow.flows.fold import fold_flow
    from mergeflow.flows.lock import record_name

    spec = make_lineage(tmp_path, f"during-{uuid.uuid4().hex[:6]}")
    (first,) = publish_burst(tmp_path / "pub", 1)
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.setdefault("a", fold_flow(spec.name, first)))
    t.start()
    with get_client(sync_client=True) as client:  # wait until the first fold holds the lock
        deadline = time.monotonic() + 120
        while client.read_variable_by_name(record_name(spec.concurrency_name)) is None:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.05)
    (second,) = publish_burst(tmp_path / "pub", 1, start=1)
    out = fold_flow(spec.name, second)
    t.join(timeout=300)
    assert [o.status for o in done["a"]] == ["accepted"]
    assert [o.checkpoint_id for o in out if o.status == "accepted"] == [second]
    assert_chain(spec.registered_model, [first, second])


def test_a_fold_whose_parent_moved_is_refused_at_commit(
    stack: RunningStack, tmp_path: Path
) -> None:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.tasks.guard import LineageMoved, confirm_commit
    from mergeflow.tasks.lineage import load_parent
    from mergeflow.tasks.values import CheckpointRef

    spec = make_lineage(tmp_path, f"cas-{uuid.uuid4().hex[:6]}")
    a, b = publish_burst(tmp_path / "pub", 2)
    stale = load_parent.fn(spec)  # what a fold that lost its lock would have built on
    backfill_flow(spec.name, [str(tmp_path / "pub" / a)])  # the lineage moves on meanwhile
    ck = CheckpointRef(id=b, uri=str(tmp_path / "pub" / b), digest="sha256:b")
    with pytest.raises(LineageMoved, match="moved on while c01 was folded"):
        confirm_commit.fn(spec, stale, ck)
    done = CheckpointRef(id=a, uri=str(tmp_path / "pub" / a), digest=_digest(spec, a))
    with pytest.raises(LineageMoved, match="nothing was registered twice"):
        confirm_commit.fn(spec, load_parent.fn(spec), done)
    confirm_commit.fn(spec, load_parent.fn(spec), ck)  # the current parent passes


def _digest(spec: Any, ck_id: str) -> str:
    from mergeflow.storage.registry import Registry

    return next(
        v.checkpoint_digest
        for v in Registry().versions(spec.registered_model)
        if v.checkpoint_id == ck_id
    )


def test_a_holder_whose_lease_was_revoked_cannot_commit(
    stack: RunningStack, tmp_path: Path
) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from mergeflow.flows.lock import LockLost, fence, lineage_lock, read_holder

    spec = make_lineage(tmp_path, f"fence-{uuid.uuid4().hex[:6]}")
    with lineage_lock(spec):
        fence(spec)  # held: passes
        with get_client(sync_client=True) as client:
            holder = read_holder(client, spec.concurrency_name)
            assert holder is not None
            client.release_concurrency_slots_with_lease(UUID(holder.lease_id))  # revoked
        with pytest.raises(LockLost, match="expired or was revoked; nothing was committed"):
            fence(spec)


# ----------------------------------------------------------------------------- served
@pytest.mark.reliability
@pytest.mark.timeout(3600)
def test_burst_of_twenty_with_every_event_duplicated_through_serve(
    stack: RunningStack, tmp_path: Path
) -> None:
    from test_flows import wait_for_version

    from mergeflow.flows.events import emit_published
    from mergeflow.flows.fold import fold_flow
    from mergeflow.flows.watch import watch_flow
    from mergeflow.storage.schemes import open_source

    n = int(os.environ.get("MERGEFLOW_BURST", "20"))
    spec = make_lineage(
        tmp_path,
        f"burst-{uuid.uuid4().hex[:6]}",
        f"s3://{stack.bucket}/burst-{uuid.uuid4().hex[:6]}",
    )
    name = f"serve-{spec.name}"
    log = start_serve(stack.stack, name, [spec])
    try:
        ids = publish_burst(tmp_path / "pub", n)
        t0 = time.monotonic()
        for ck in open_source(spec.sources[0]).list():
            ref = ck.model_copy(update={"source": spec.sources[0]})
            emit_published(spec.name, ref)
            emit_published(spec.name, ref)  # every event twice
        run_all([lambda: watch_flow([spec.name]), lambda: watch_flow([spec.name])])  # overlapping
        fold_flow(spec.name, checkpoint_id=ids[n // 2])  # a fold started by hand meanwhile
        wait_for_version(spec.registered_model, ids[-1], log, timeout=1800)
        elapsed = time.monotonic() - t0
        assert_chain(spec.registered_model, ids)
        print(
            f"RELIABILITY served burst: {n} checkpoints, {2 * n} duplicated events + 2 "
            f"overlapping watch runs + 1 fold by hand: {n} versions in order in {elapsed:.0f} s "
            f"({n / elapsed * 60:.1f} folds/min)"
        )
    finally:
        stack.stack.stop_process(name)
