"""The watch flow: find newly published checkpoints and emit an event that folds them.

One run watches every lineage that shares a schedule (``serve`` makes one watch deployment
per distinct schedule: each run is a process, and ten lineages ticking apart started ten
processes per interval, more than two cores could start). For each lineage it lists every
source (complete checkpoints only, oldest publication first), drops those the registry has
seen (folded or rejected), and unless a queued or running ``mergeflow-fold`` run already
covers them all, emits ``mergeflow.checkpoint.published`` for the newest one: its fold run
folds every pending checkpoint up to it, in publication order (:func:`queue.to_emit`).
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
from mergeflow.flows.queue import to_emit
from mergeflow.tasks.lineage import load_spec, seen_checkpoints
from mergeflow.tasks.values import CheckpointRef

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


def emit_new(lineage: str, pending: list[CheckpointRef], what: str) -> list[str]:
    """Emit the event that folds ``pending`` (see :func:`queue.to_emit`); returns the id emitted.

    ``what`` says where the pending list came from, for the log line.
    """
    active = active_fold_targets(lineage) if pending else set()
    ck = to_emit(pending, active)
    if ck is not None:
        emit_published(lineage, ck)
        earlier = len(pending) - 1
        said = f"emitted {ck.id}" + (
            f", its fold run folds the {earlier} before it" if earlier else ""
        )
    else:
        said = "a queued or running fold covers them" if pending else "nothing new"
    get_run_logger().info(f"{lineage}: {what}: {len(pending)} pending; {said}")
    return [ck.id] if ck else []


def _watch(lineage: str) -> list[str]:
    """Emit the event for one lineage's new checkpoints; returns the id emitted."""
    spec = load_spec(lineage)
    return emit_new(lineage, pending_checkpoints(spec, seen_checkpoints(spec)), "watch")


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
