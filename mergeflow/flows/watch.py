"""The watch flow: find newly published checkpoints and emit one event for each.

Runs on the lineage's schedule. It lists every source (complete checkpoints only, oldest
publication first), drops those the registry has seen (folded or rejected) and those a
queued or running ``mergeflow-fold`` run already targets, and emits
``mergeflow.checkpoint.published`` for the rest, in publication order.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from mergeflow.flows.events import emit_published
from mergeflow.flows.fold import pending_checkpoints
from mergeflow.flows.queue import first_uncovered
from mergeflow.tasks.lineage import load_spec, seen_checkpoints

ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")


def active_fold_targets(lineage: str) -> set[str]:
    """Checkpoint ids and digests that a not-yet-finished ``mergeflow-fold`` run of ``lineage`` targets."""

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["mergeflow-fold"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(s) for s in ACTIVE_STATES])
                )
            ),
            limit=200,
        )
    out: set[str] = set()
    for r in runs:
        p = r.parameters or {}
        if p.get("lineage") == lineage:
            out.update(str(p[k]) for k in ("checkpoint_id", "checkpoint_digest") if p.get(k))
    return out


@flow(name="mergeflow-watch", flow_run_name="watch-{lineage}", log_prints=True)
def watch_flow(lineage: str) -> list[str]:
    """Emit ``mergeflow.checkpoint.published`` for each new checkpoint; returns their ids."""
    log = get_run_logger()
    spec = load_spec(lineage)
    pending = pending_checkpoints(spec, seen_checkpoints(spec))
    active = active_fold_targets(lineage) if pending else set()
    emitted = []
    for ck in pending[first_uncovered(pending, active) :]:
        emit_published(lineage, ck)
        emitted.append(ck.id)
    log.info(
        f"{lineage}: {len(pending)} pending, emitted {len(emitted)} event(s): {', '.join(emitted) or '-'}"
    )
    return emitted
