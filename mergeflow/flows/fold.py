"""Fold flows: one checkpoint into the last accepted state, with evaluation, gate and registry.

``mergeflow-fold`` (event-triggered deployment) holds the lineage's Prefect global
concurrency limit ``mergeflow-fold-<lineage>`` (1 slot) for the whole run, so at most one
fold per lineage runs at a time. Inside the lock it re-reads what the registry has seen
and folds, **in publication order**, every pending checkpoint of the lineage's sources up
to and including the one named by the event. So the order never depends on which run
got the lock first, a duplicate event finds its checkpoint folded and skips, and a
checkpoint whose event was lost is folded by the next one.

Each checkpoint is one ``mergeflow-fold-checkpoint`` subflow:

1. load the last accepted state (or the step-0 state);
2. validate the checkpoint against the base (headers only); a bad one is recorded as a
   rejected version with its reason (``Registry.record_rejection``) and never retried;
3. fold it (one fold, or one per candidate as mapped tasks, each into its own method's
   state of the parent) into a fresh prefix ``<storage>/steps/<NNNN>-<id>/state``; a lineage
   whose method is a pool method merges the parent's pool plus the checkpoint again instead
   (:mod:`mergeflow.flows.pool`);
4. export the merged weights to ``…/model`` (HF layout);
5. evaluate (validation for the gate and selection, test for the report) and gate; the
   best candidate becomes the version, and each method's best keeps its state for the
   next fold (the others are deleted);
6. register the MLflow version LAST (the commit point, :mod:`mergeflow.flows.commit`). A
   crash before it leaves no version: the retry folds again into a new prefix, and ``gc``
   removes the orphan.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, unmapped

from mergeflow.errors import CheckpointChanged, CheckpointError, ConfigError
from mergeflow.flows.commit import Merged, commit, reject, skip
from mergeflow.flows.dask import dask_fold
from mergeflow.flows.lock import LOCK_LEASE_S as LOCK_LEASE_S  # re-exported
from mergeflow.flows.lock import ensure_fold_lock as ensure_fold_lock  # re-exported
from mergeflow.flows.lock import lineage_lock, reap_crashed_run
from mergeflow.flows.pool import merge_pool_run
from mergeflow.flows.queue import order_pending, target_index
from mergeflow.lineage import LineageSpec
from mergeflow.tasks import layout
from mergeflow.tasks.evaluate import evaluate_model
from mergeflow.tasks.fold import (
    discard_prefixes,
    export_model,
    fold_checkpoint,
    validate_checkpoint,
)
from mergeflow.tasks.guard import (
    identify_checkpoint,
    repair_aliases,
    screen_checkpoint,
)
from mergeflow.tasks.lineage import (
    checkpoint_by_uri,
    list_source,
    load_parent,
    load_spec,
    seen_checkpoints,
)
from mergeflow.tasks.values import CheckpointRef, FoldOutcome, ParentState


def pending_checkpoints(spec: LineageSpec, seen: set[str]) -> list[CheckpointRef]:
    """Complete checkpoints of every source not folded or rejected yet, in publication order."""
    return order_pending([list_source(uri) for uri in spec.sources], seen)


@flow(name="mergeflow-fold-checkpoint", flow_run_name="{spec.name}-{ck.id}", log_prints=True)
def fold_one(spec: LineageSpec, ck: CheckpointRef, replaces: str | None = None) -> FoldOutcome:
    """Fold one checkpoint (see the module docstring). Call with the lineage's lock held.

    A lineage whose method is a pool method merges the last accepted version's pool plus
    ``ck`` again instead (:func:`mergeflow.flows.pool.merge_pool_run`); the rest is the same.
    ``replaces``: this fold replays that version after a dropped checkpoint (flows/replay.py).
    """
    t0 = time.perf_counter()
    parent = load_parent(spec, replaying=replaces is not None)
    ck = identify_checkpoint(ck)
    try:
        ck = validate_checkpoint(spec, ck)
        screen_checkpoint(spec, ck)
    except CheckpointChanged as e:
        return skip(ck, e)
    except CheckpointError as e:
        return reject(spec, parent, ck, str(e), replaces)
    load_s = time.perf_counter() - t0
    try:
        if spec.method_kind == "pool":
            merged = merge_pool_run(spec, parent, [ck])
        else:
            merged = _fold_candidates(spec, parent, ck)
    except CheckpointChanged as e:
        return skip(ck, e)
    except CheckpointError as e:  # e.g. NaN values found while streaming the tensors
        return reject(spec, parent, ck, str(e), replaces)
    return commit(spec, parent, ck, merged, replaces, load_s)


def _fold_candidates(spec: LineageSpec, parent: ParentState, ck: CheckpointRef) -> Merged:
    """Fold, export and evaluate every candidate (mapped tasks when there are several): each
    folds into its own method's state of the parent. Raises the error of the first failing
    candidate in order, after every candidate's tasks have finished (no write follows a
    discard), and discards every candidate's prefix then."""
    cands = spec.candidate_folds()
    prefixes = [
        layout.new_prefix(spec, parent.step + 1, c.label if len(cands) > 1 else None) for c in cands
    ]
    try:
        if len(cands) == 1:
            c = cands[0]
            fold_step = dask_fold if spec.dask is not None else fold_checkpoint
            fold = fold_step(spec, parent, ck, c.label, c.params, prefixes[0], c.method)
            model = export_model(spec, fold)
            return Merged(cands, prefixes, [fold], [model], [evaluate_model(spec, fold, model)])
        ff = fold_checkpoint.map(
            unmapped(spec),
            unmapped(parent),
            unmapped(ck),
            [c.label for c in cands],
            [c.params for c in cands],
            prefixes,
            [c.method for c in cands],
        )
        mf = export_model.map(unmapped(spec), ff)
        ef = evaluate_model.map(unmapped(spec), ff, mf)
        for futures in (ff, mf, ef):
            futures.wait()
        folds = [f.result() for f in ff]  # in candidate order: the first failing one is reported
        return Merged(cands, prefixes, folds, [f.result() for f in mf], [f.result() for f in ef])
    except CheckpointError:
        discard_prefixes(prefixes)
        raise


@flow(
    name="mergeflow-fold",
    flow_run_name="fold-{lineage}-{checkpoint_id}",
    log_prints=True,
    on_crashed=[reap_crashed_run],
)
def fold_flow(
    lineage: str, checkpoint_id: str, checkpoint_uri: str = "", checkpoint_digest: str = ""
) -> list[FoldOutcome]:
    """Fold a published checkpoint (and any earlier pending one) into ``lineage``, one at a time."""

    log = get_run_logger()
    spec = load_spec(lineage)
    with lineage_lock(spec, fold_slot=True):
        repair_aliases(spec)
        seen = seen_checkpoints(spec)
        if checkpoint_id in seen or (checkpoint_digest and checkpoint_digest in seen):
            log.info(f"{checkpoint_id} is already folded or rejected in {lineage}; nothing to do")
            return [
                FoldOutcome(
                    checkpoint_id=checkpoint_id,
                    status="skipped",
                    reason="already folded or rejected",
                )
            ]
        pending = pending_checkpoints(spec, seen)
        i = target_index(pending, checkpoint_id, checkpoint_uri, checkpoint_digest)
        if i is not None:
            queue = pending[: i + 1]
        elif checkpoint_uri:
            queue = [CheckpointRef(id=checkpoint_id, uri=checkpoint_uri, digest=checkpoint_digest)]
        else:
            raise ConfigError(
                f"checkpoint {checkpoint_id!r} is in none of {lineage}'s sources; pass checkpoint_uri"
            )
        if len(queue) > 1:
            log.info(
                f"folding {len(queue) - 1} earlier pending checkpoint(s) first, in publication order"
            )
        return [fold_one(spec, ck) for ck in queue]


@flow(
    name="mergeflow-backfill",
    flow_run_name="backfill-{lineage}",
    log_prints=True,
    on_crashed=[reap_crashed_run],
)
def backfill_flow(lineage: str, checkpoints: list[str]) -> list[FoldOutcome]:
    """Fold the given checkpoint URIs in this order (already folded ones are skipped)."""

    spec = load_spec(lineage)
    out: list[FoldOutcome] = []
    with lineage_lock(spec, fold_slot=True):
        repair_aliases(spec)
        for uri in checkpoints:
            ck = checkpoint_by_uri(uri)
            seen = seen_checkpoints(spec)
            if ck.id in seen or (ck.digest and ck.digest in seen):
                out.append(
                    FoldOutcome(
                        checkpoint_id=ck.id, status="skipped", reason="already folded or rejected"
                    )
                )
                continue
            out.append(fold_one(spec, ck))
    return out
