"""Tasks of a fold whose per-tensor work is spread over a Dask cluster (``spec.dask``).

A continual fold is per tensor except for its scalar epilogue: each tensor's new state
depends only on that tensor's base, task vector and previous state, and the method's
``finish`` needs only two sums (‖D_t‖², ‖τ_t‖²) over all tensors. So a distributed fold is

1. :func:`plan_groups`: validate the fold from headers, run the method's pre-pass, begin
   the state write and split the tensor names into groups of similar byte size;
2. :func:`fold_group` per group, on any worker: fold its tensors into one part of the new
   state and return the part's weight map and its two partial sums;
3. :func:`commit_groups`: write the heads, run ``finish`` on the summed norms and commit
   the state (index, then ``state.json`` last) through the same
   :class:`~mergeflow.storage.states.StateWrite` as a single-process fold.

The result equals the single-process fold tensor for tensor; the scale can differ in the
last bits because the norms are summed in another order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict

from mergeflow.lineage import LineageSpec
from mergeflow.merging import engine
from mergeflow.merging.methods import get_continual
from mergeflow.storage import states, vocab
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.schemes import open_checkpoint
from mergeflow.storage.shard_writer import ShardedWriter
from mergeflow.tasks import layout
from mergeflow.tasks.calibration import checkpoint_stats, fold_objective
from mergeflow.tasks.fold import fold_output, fold_source
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import CheckpointRef, FoldOutput, ParentState


class GroupPlan(BaseModel):
    """What every group task needs: where to read and write, the plan, the groups."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    src_uri: str
    out_uri: str
    plan: engine.FoldPlan
    groups: list[list[str]]
    started: float
    """Wall-clock start (``time.time``: workers are other processes)."""


class GroupResult(BaseModel):
    """One folded group: its part's weight map and its partial sums of squares."""

    model_config = ConfigDict(frozen=True)

    weight_map: dict[str, str]
    sq_state: float
    sq_tau: float
    sq_base: float | None = None


def split_groups(sizes: list[tuple[str, int]], groups: int) -> list[list[str]]:
    """Contiguous groups of names with roughly equal total bytes (order kept, none empty)."""
    groups = max(1, min(groups, len(sizes)))
    total = sum(s for _, s in sizes) or 1
    out: list[list[str]] = [[]]
    acc = 0
    for i, (name, size) in enumerate(sizes):
        left_items = len(sizes) - i
        left_groups = groups - len(out)
        if (
            out[-1]
            and (acc >= total * len(out) / groups or left_items == left_groups)
            and left_groups > 0
        ):
            out.append([])
        out[-1].append(name)
        acc += size
    return out


def _open(
    spec: LineageSpec, ck: CheckpointRef, state_uri: str
) -> tuple[OpenedCheckpoint, OpenedCheckpoint, states.StateManifest, vocab.VocabFold]:
    """The base, the checkpoint, the state, and the fold's readers (vocabulary rows aligned)."""
    base = layout.open_base(spec)
    checkpoint = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    manifest, fold = states.open_fold(layout.store(state_uri), base, checkpoint, ck.id)
    return base, checkpoint, manifest, fold


def _write(plan: GroupPlan, manifest: states.StateManifest) -> states.StateWrite:
    return states.StateWrite(
        layout.store(plan.out_uri),
        plan.plan.step,
        parent=manifest,
        parent_store=layout.store(plan.src_uri),
    )


@task(name="plan-groups", **io_task)
def plan_groups(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    params: dict[str, Any],
    prefix: str,
    method: str | None = None,
) -> GroupPlan:
    """Validate the fold, run the pre-pass, begin the state write, split the tensors into groups.

    ``method``: the candidate's (default: the lineage's); the fold reads the parent's state of it.
    """
    assert spec.dask is not None
    t0 = time.time()
    name = method or spec.method
    src = fold_source(parent, params, prefix, name)
    base, checkpoint, manifest, fold = _open(spec, ck, src.uri)
    method_ = get_continual(name)
    plan = engine.plan_fold(
        manifest.info,
        fold.base,
        fold.checkpoint,
        checkpoint_id=ck.id,
        digest=ck.digest,
        device=spec.device,
        state=fold.state,
        stats=fold.remap_stats(checkpoint_stats(spec, ck, checkpoint, base)[0])
        if method_.statistics
        else None,
        objective=(
            fold_objective(spec, parent, ck, checkpoint, base, params)
            if method_.needs_objective
            else None
        ),
    )
    out = layout.store(layout.state_uri_of(prefix))
    states.StateWrite.begin(out, manifest, src)
    sizes = [(k, math.prod(fold.base.meta(k).shape) or 1) for k in plan.keys]
    return GroupPlan(
        src_uri=src.uri,
        out_uri=out.uri,
        plan=plan,
        groups=split_groups(sizes, spec.dask.groups),
        started=t0,
    )


class _Recorded:
    """A part writer that remembers the names it was given (a method's extra slots included)."""

    def __init__(self, writer: ShardedWriter) -> None:
        self.writer = writer
        self.names: list[str] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.names.append(key)
        self.writer.add(key, tensor)

    def commit(self, metadata: Mapping[str, str] | None = None) -> list[str]:
        return self.writer.commit(metadata)

    def abort(self) -> None:
        self.writer.abort()


@task(name="fold-group", task_run_name="fold-group-{index}")
def fold_group(spec: LineageSpec, ck: CheckpointRef, plan: GroupPlan, index: int) -> GroupResult:
    """Fold one group of tensors into part ``index`` of the new state (not committed)."""
    base, checkpoint, manifest, fold = _open(spec, ck, plan.src_uri)
    keys = plan.groups[index]
    write = _write(plan, manifest)
    part = _Recorded(write.part(index + 1))
    try:
        sums = engine.fold_tensors(
            manifest.info,
            plan.plan,
            fold.state,
            fold.base,
            fold.checkpoint,
            part,
            keys=keys,
            device=spec.device,
            base_norm=spec.max_task_vector_ratio is not None,
            stats=fold.remap_stats(checkpoint_stats(spec, ck, checkpoint, base)[0])
            if plan.plan.with_stats
            else None,
        )
        names = part.commit(engine.state_metadata(plan.plan.step))
    except BaseException:
        part.abort()
        raise
    return GroupResult(
        weight_map=write.part_map(index + 1, names, part.names),
        sq_state=sums.state,
        sq_tau=sums.task_vector,
        sq_base=sums.base,
    )


@task(name="commit-groups", **io_task)
def commit_groups(
    spec: LineageSpec,
    ck: CheckpointRef,
    plan: GroupPlan,
    results: list[GroupResult],
    label: str,
    prefix: str,
) -> FoldOutput:
    """Screen the summed ‖τ‖/‖θ₀‖, finish the method's scalars, write the heads, commit."""
    base, checkpoint, manifest, fold = _open(spec, ck, plan.src_uri)
    write = _write(plan, manifest)
    p = plan.plan
    sums = engine.FoldSums(0.0, 0.0, 0.0 if spec.max_task_vector_ratio is not None else None)
    for r in results:
        sums += engine.FoldSums(r.sq_state, r.sq_tau, r.sq_base)
    info = engine.finish_fold(manifest.info, p, sums, checkpoint.uri, spec.max_task_vector_ratio)
    heads = write.heads()
    for k in p.heads:
        heads.add(k, fold.checkpoint.get(k))
    heads.commit({"mergeflow.checkpoint": p.checkpoint_id})
    by_key = {k: v for r in results for k, v in r.weight_map.items()}
    missing = [k for k in p.keys if k not in by_key]
    if missing:
        raise RuntimeError(f"the groups folded no tensor {missing[0]!r}; nothing was committed")
    vocab.save(
        write.dst,
        write.rel_tensors,
        fold,
        states.vocab_folder(layout.store(plan.src_uri), manifest),
    )
    write.commit(fold.record(info), parts=[by_key])  # the merged tensors and their extra slots
    return fold_output(label, prefix, info, time.time() - plan.started)
