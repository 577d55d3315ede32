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
   state of the parent) into a fresh prefix ``<storage>/steps/<NNNN>-<id>/state``;
4. export the merged weights to ``…/model`` (HF layout);
5. evaluate (validation for the gate and selection, test for the report) and gate; the
   best candidate becomes the version, and each method's best keeps its state for the
   next fold (the others are deleted);
6. register the MLflow version LAST (the commit point). A crash before it leaves no
   version: the retry folds again into a new prefix, and ``gc`` removes the orphan.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, unmapped

from mergeflow.errors import CheckpointChanged, CheckpointError, ConfigError
from mergeflow.evaluation.continual import gate_metrics
from mergeflow.flows.dask import dask_fold
from mergeflow.flows.lock import LOCK_LEASE_S as LOCK_LEASE_S  # re-exported
from mergeflow.flows.lock import ensure_fold_lock as ensure_fold_lock  # re-exported
from mergeflow.flows.lock import fence, lineage_lock, reap_crashed_run
from mergeflow.flows.queue import order_pending, target_index
from mergeflow.lineage import CandidateFold, LineageSpec
from mergeflow.tasks import layout
from mergeflow.tasks.evaluate import evaluate_model, gate, own_scores, save_evaluation
from mergeflow.tasks.fold import (
    discard_prefixes,
    export_model,
    fold_checkpoint,
    validate_checkpoint,
)
from mergeflow.tasks.guard import (
    confirm_commit,
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
from mergeflow.tasks.register import matrix_rows, record_rejection, register_fold
from mergeflow.tasks.values import (
    CheckpointRef,
    EvalOutput,
    FoldOutcome,
    FoldOutput,
    ModelOutput,
    OwnScores,
    ParentState,
)


def pending_checkpoints(spec: LineageSpec, seen: set[str]) -> list[CheckpointRef]:
    """Complete checkpoints of every source not folded or rejected yet, in publication order."""
    return order_pending([list_source(uri) for uri in spec.sources], seen)


def _record(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, **fields: Any
) -> dict[str, Any]:
    return {
        "lineage": spec.name,
        "registered_model": spec.registered_model,
        "step": parent.step + 1,
        "checkpoint_id": ck.id,
        "checkpoint_uri": ck.uri,
        "checkpoint_digest": ck.digest,
        "parent_version": parent.version,
        "method": spec.method,
        "params": parent.params,
        "base_uri": spec.base,
        "state_uri": "",
        "model_uri": "",
        **fields,
    }


@flow(name="mergeflow-fold-checkpoint", flow_run_name="{spec.name}-{ck.id}", log_prints=True)
def fold_one(spec: LineageSpec, ck: CheckpointRef, replaces: str | None = None) -> FoldOutcome:
    """Fold one checkpoint (see the module docstring). Call with the lineage's lock held.

    ``replaces``: this fold replays that version after a dropped checkpoint (flows/replay.py).
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    parent = load_parent(spec, replaying=replaces is not None)
    ck = identify_checkpoint(ck)
    try:
        ck = validate_checkpoint(spec, ck)
        screen_checkpoint(spec, ck)
    except CheckpointChanged as e:
        return _skip(ck, e)
    except CheckpointError as e:
        return _reject(spec, parent, ck, str(e), replaces)
    load_s = time.perf_counter() - t0
    cands = spec.candidate_folds()
    prefixes = [
        layout.new_prefix(spec, parent.step + 1, c.label if len(cands) > 1 else None) for c in cands
    ]
    try:
        folds, models, evals = _fold_candidates(spec, parent, ck, cands, prefixes)
    except CheckpointChanged as e:
        discard_prefixes(prefixes)
        return _skip(ck, e)
    except CheckpointError as e:  # e.g. NaN values found while streaming the tensors
        discard_prefixes(prefixes)
        return _reject(spec, parent, ck, str(e), replaces)
    own = own_scores(spec, ck, parent)
    methods = [c.method for c in cands] if len(cands) > 1 else []
    choice = gate(spec, evals, parent.validation, own, methods)
    best, accepted, reasons = choice.index, choice.accepted, choice.reasons
    keep = {best, *choice.heads.values()}  # the registered fold and each method's chain head
    discard_prefixes([p for i, p in enumerate(prefixes) if i not in keep])
    fold, model, ev = folds[best], models[best], evals[best]
    metrics, matrix = _metrics(spec, parent, ck, fold, model, ev, own, load_s)
    for c, cand in zip(cands, evals, strict=True):
        if len(evals) > 1 and cand.validation:
            metrics[f"candidate/{c.label}/val/avg"] = sum(cand.validation.values()) / len(
                cand.validation
            )
    rows, names = matrix_rows(matrix)
    save_evaluation(
        fold.prefix,
        {
            "checkpoint": ck.model_dump(mode="json"),
            "status": "accepted" if accepted else "rejected",
            "validation": ev.validation,
            "test": ev.test,
            "matrix": matrix.model_dump(mode="json"),
            "candidate": cands[best].label,
        },
    )
    record = _record(
        spec,
        parent,
        ck,
        replaces=replaces,
        params=fold.params,
        state_uri=fold.state_uri,
        model_uri=model.model_uri,
        method=fold.method or spec.method,
        status="accepted" if accepted else "rejected",
        reason="; ".join(reasons),
        metrics=metrics,
        accuracy_matrix=rows,
        task_names=names,
        eval_datasets=ev.datasets,
        candidates=[
            {
                "label": c.label,
                "method": c.method,
                "params": f.params,
                "state_uri": f.state_uri if i in keep else "",
                "validation": e.validation,
            }
            for i, (c, f, e) in enumerate(zip(cands, folds, evals, strict=True))
        ]
        if len(cands) > 1
        else [],
    )
    try:
        _confirm(spec, parent, ck, replaces)
    except CheckpointChanged as e:
        discard_prefixes([prefixes[i] for i in sorted(keep)])
        return _skip(ck, e)
    version = register_fold(record)
    status = "accepted" if accepted else "rejected"
    log.info(
        f"{ck.id}: {status} as version {version.version} (step {fold.step}){': ' + record['reason'] if reasons else ''}"
    )
    return FoldOutcome(
        checkpoint_id=ck.id,
        status=status,
        version=version.version,
        step=fold.step,
        reason=record["reason"],
        metrics=metrics,
    )


def _fold_candidates(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    cands: list[CandidateFold],
    prefixes: list[str],
) -> tuple[list[FoldOutput], list[ModelOutput], list[EvalOutput]]:
    """Fold, export and evaluate every candidate (mapped tasks when there are several): each
    folds into its own method's state of the parent. Raises the error of the first failing
    candidate in order, after every candidate's tasks have finished (no write follows a discard)."""
    if len(cands) == 1:
        c = cands[0]
        fold_step = dask_fold if spec.dask is not None else fold_checkpoint
        fold = fold_step(spec, parent, ck, c.label, c.params, prefixes[0], c.method)
        model = export_model(spec, fold)
        return [fold], [model], [evaluate_model(spec, fold, model)]
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
    return folds, [f.result() for f in mf], [f.result() for f in ef]


def _metrics(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    fold: FoldOutput,
    model: ModelOutput,
    ev: EvalOutput,
    own: OwnScores,
    load_s: float,
) -> tuple[dict[str, float], Any]:
    """Test scores per task, ACC/BWT of the chain plus this fold, normalized scores
    (``test/norm/<task>``, ``test/norm_avg``, the same on ``val/``), validation scores,
    forgetting against the champion on validation (``val/forgetting/<task>``,
    ``val/forgetting_avg``), timings."""
    m: dict[str, float] = {
        "load_seconds": load_s,
        "fold_seconds": fold.seconds,
        "stats_seconds": fold.stats_seconds,
        "export_seconds": model.seconds,
        "eval_seconds": ev.seconds,
        "peak_rss_mb": fold.peak_rss_mb,
        "step": float(fold.step),
    }
    matrix = parent.matrix
    if ev.test:
        matrix = parent.matrix.append(ck.id, ev.test)
        m.update({f"test/{k}": v for k, v in ev.test.items()})
        m["test/avg"] = matrix.acc()
        bwt = matrix.bwt()
        if bwt is not None:
            m["test/bwt"] = bwt
    if ev.validation:
        m.update({f"val/{k}": v for k, v in ev.validation.items()})
        m["val/avg"] = sum(ev.validation.values()) / len(ev.validation)
    hib = spec.evaluation.higher_is_better if spec.evaluation is not None else True
    m.update(gate_metrics("test", ev.test, own.test, higher_is_better=hib))
    m.update(
        gate_metrics("val", ev.validation, own.validation, parent.validation, higher_is_better=hib)
    )
    return m, matrix


def _reject(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, reason: str, replaces: str | None
) -> FoldOutcome:
    get_run_logger().warning(f"{ck.id}: rejected, not folded: {reason}")
    try:
        _confirm(spec, parent, ck, replaces)
    except CheckpointChanged as e:
        return _skip(ck, e)
    version = record_rejection(
        _record(spec, parent, ck, status="rejected", reason=reason, replaces=replaces)
    )
    return FoldOutcome(
        checkpoint_id=ck.id,
        status="rejected",
        version=version.version,
        step=parent.step + 1,
        reason=reason,
    )


def _confirm(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, replaces: str | None
) -> None:
    """Right before a version is registered: the lock is still ours (``fence``) and the
    lineage and the checkpoint did not move (``confirm_commit``); see flows/lock.py."""
    fence(spec)
    confirm_commit(spec, parent, ck, replaces is not None)


def _skip(ck: CheckpointRef, e: CheckpointChanged) -> FoldOutcome:
    get_run_logger().warning(f"{ck.id}: skipped: {e}")
    return FoldOutcome(checkpoint_id=ck.id, status="skipped", reason=str(e))


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
