"""The end of every fold and pool merge: own scores, gate, metrics, evaluation file, the commit point.

A continual fold (:func:`mergeflow.flows.fold.fold_one`) and a pool merge
(:mod:`mergeflow.flows.pool`) each produce a :class:`Merged`: one fold output, exported model
and evaluation per candidate, written under fresh prefixes. :func:`commit` turns it into a
version exactly the same way for both: the own scores of the checkpoints entering the chain,
the gate (and each method's chain head), the metrics and accuracy matrix, ``evaluation.json``,
then, with the lock fenced and the lineage confirmed unmoved, the MLflow version (the commit
point). Plain functions called inside a flow run: every step is a task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from mergeflow.errors import CheckpointChanged
from mergeflow.evaluation.continual import gate_metrics
from mergeflow.flows.lock import fence
from mergeflow.lineage import CandidateFold, LineageSpec
from mergeflow.tasks.evaluate import gate, own_scores, save_evaluation
from mergeflow.tasks.fold import discard_prefixes
from mergeflow.tasks.guard import confirm_commit
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


@dataclass(frozen=True)
class Merged:
    """What one fold or pool merge wrote, per candidate (a pool merge has one), before the gate.

    ``pool``: a pool merge's checkpoints in order (the version's ``checkpoint`` is the last);
    empty for a fold."""

    cands: list[CandidateFold]
    prefixes: list[str]
    folds: list[FoldOutput]
    models: list[ModelOutput]
    evals: list[EvalOutput]
    pool: list[CheckpointRef] = field(default_factory=list)


def fold_record(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, **fields: Any
) -> dict[str, Any]:
    """The registry record of a fold of ``ck`` on ``parent`` (``fields`` override)."""
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


def commit(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    merged: Merged,
    replaces: str | None,
    load_s: float,
) -> FoldOutcome:
    """Gate ``merged`` and register the best candidate as a version (see the module docstring)."""
    log = get_run_logger()
    cands, prefixes, folds, models, evals = (
        merged.cands,
        merged.prefixes,
        merged.folds,
        merged.models,
        merged.evals,
    )
    entering = [c for c in merged.pool[:-1] if c.id not in parent.folded]
    own = own_scores(spec, ck, parent, entering)
    methods = [c.method for c in cands] if len(cands) > 1 else []
    choice = gate(spec, evals, parent.validation, own, methods)
    best, accepted, reasons = choice.index, choice.accepted, choice.reasons
    keep = {best, *choice.heads.values()}  # the registered fold and each method's chain head
    discard_prefixes([p for i, p in enumerate(prefixes) if i not in keep])
    fold, model, ev = folds[best], models[best], evals[best]
    metrics, matrix = fold_metrics(spec, parent, ck, fold, model, ev, own, load_s)
    for c, cand in zip(cands, evals, strict=True):
        if len(evals) > 1 and cand.validation:
            metrics[f"candidate/{c.label}/val/avg"] = sum(cand.validation.values()) / len(
                cand.validation
            )
    rows, names = matrix_rows(matrix)
    status = "accepted" if accepted else "rejected"
    save_evaluation(
        fold.prefix,
        {
            "checkpoint": ck.model_dump(mode="json"),
            "status": status,
            "validation": ev.validation,
            "test": ev.test,
            "matrix": matrix.model_dump(mode="json"),
            "candidate": cands[best].label,
            **({"pool": [c.model_dump(mode="json") for c in merged.pool]} if merged.pool else {}),
        },
    )
    record = fold_record(
        spec,
        parent,
        ck,
        replaces=replaces,
        step=fold.step,
        params=fold.params,
        state_uri=fold.state_uri,
        model_uri=model.model_uri,
        method=fold.method or spec.method,
        status=status,
        reason="; ".join(reasons),
        metrics=metrics,
        accuracy_matrix=rows,
        task_names=names,
        eval_datasets=ev.datasets,
        candidates=_candidates(cands, folds, evals, keep),
        pool=[{"id": c.id, "uri": c.uri, "digest": c.digest} for c in merged.pool],
    )
    try:
        confirm(spec, parent, ck, replaces)
    except CheckpointChanged as e:
        discard_prefixes([prefixes[i] for i in sorted(keep)])
        return skip(ck, e)
    version = register_fold(record)
    what = f" (a pool of {len(merged.pool)})" if merged.pool else ""
    log.info(
        f"{ck.id}{what}: {status} as version {version.version} (step {fold.step})"
        f"{': ' + record['reason'] if reasons else ''}"
    )
    return FoldOutcome(
        checkpoint_id=ck.id,
        status=status,
        version=version.version,
        step=fold.step,
        reason=record["reason"],
        metrics=metrics,
    )


def _candidates(
    cands: Sequence[CandidateFold],
    folds: Sequence[FoldOutput],
    evals: Sequence[EvalOutput],
    keep: set[int],
) -> list[dict[str, Any]]:
    """Every candidate's record when the fold tried several (the kept states are the chains)."""
    if len(cands) < 2:
        return []
    return [
        {
            "label": c.label,
            "method": c.method,
            "params": f.params,
            "state_uri": f.state_uri if i in keep else "",
            "validation": e.validation,
        }
        for i, (c, f, e) in enumerate(zip(cands, folds, evals, strict=True))
    ]


def fold_metrics(
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


def reject(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, reason: str, replaces: str | None
) -> FoldOutcome:
    """Register ``ck`` as a rejected version without weights (it is never folded again)."""
    get_run_logger().warning(f"{ck.id}: rejected, not folded: {reason}")
    try:
        confirm(spec, parent, ck, replaces)
    except CheckpointChanged as e:
        return skip(ck, e)
    version = record_rejection(
        fold_record(spec, parent, ck, status="rejected", reason=reason, replaces=replaces)
    )
    return FoldOutcome(
        checkpoint_id=ck.id,
        status="rejected",
        version=version.version,
        step=parent.step + 1,
        reason=reason,
    )


def confirm(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, replaces: str | None
) -> None:
    """Right before a version is registered: the lock is still ours (``fence``) and the
    lineage and the checkpoint did not move (``confirm_commit``); see flows/lock.py."""
    fence(spec)
    confirm_commit(spec, parent, ck, replaces is not None)


def skip(ck: CheckpointRef, e: CheckpointChanged) -> FoldOutcome:
    """The outcome of a checkpoint whose files changed since it was listed (listed again)."""
    get_run_logger().warning(f"{ck.id}: skipped: {e}")
    return FoldOutcome(checkpoint_id=ck.id, status="skipped", reason=str(e))
