"""The watch flow: find newly published checkpoints and emit one event for each.

One run watches every lineage that shares a schedule (``serve`` makes one watch deployment
per distinct schedule: each run is a process, and ten lineages ticking apart started ten
processes per interval, more than two cores could start). For each lineage it lists every
source (complete checkpoints only, oldest publication first), drops those the registry has
seen (folded or rejected) and those a queued or running ``mergeflow-fold`` run already
targets, and emits ``mergeflow.checkpoint.published`` for the rest, in publication order.
A lineage whose source fails does not stop the others; the run then fails naming it.
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

from mergeflow.errors import MergeflowError
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


def _run_name() -> str:
    """``watch-<lineage>``, or the first lineages and how many more."""
    from prefect.runtime import flow_run

    names = list(flow_run.parameters.get("lineages") or [])
    shown = ",".join(names[:3]) + (f"+{len(names) - 3}" if len(names) > 3 else "")
    return f"watch-{shown}"


def _watch(lineage: str) -> list[str]:
    """Emit the events of one lineage's new checkpoints; returns their ids."""
    spec = load_spec(lineage)
    pending = pending_checkpoints(spec, seen_checkpoints(spec))
    active = active_fold_targets(lineage) if pending else set()
    emitted = []
    for ck in pending[first_uncovered(pending, active) :]:
        emit_published(lineage, ck)
        emitted.append(ck.id)
    get_run_logger().info(
        f"{lineage}: {len(pending)} pending, emitted {len(emitted)} event(s): {', '.join(emitted) or '-'}"
    )
    return emitted


@flow(name="mergeflow-watch", flow_run_name=_run_name, log_prints=True)
def watch_flow(lineages: list[str]) -> dict[str, list[str]]:
    """Emit ``mergeflow.checkpoint.published`` for each new checkpoint of each lineage;
    returns the emitted checkpoint ids by lineage."""
    log = get_run_logger()
    emitted: dict[str, list[str]] = {}
    failed: list[tuple[str, Exception]] = []
    for lineage in lineages:
        try:
            emitted[lineage] = _watch(lineage)
        except Exception as err:  # one lineage's broken source must not stop the others
            log.error(f"{lineage}: watch failed: {err}")
            failed.append((lineage, err))
    if len(failed) == 1:
        raise failed[0][1]
    if failed:
        names = "; ".join(f"{lineage}: {err}" for lineage, err in failed)
        raise MergeflowError(f"watch failed for {len(failed)} lineages: {names}") from failed[0][1]
    return emitted
