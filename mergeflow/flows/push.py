"""The push flow: what ``watch`` does, for one source, when a registry says something changed.

The webhook receiver (:mod:`mergeflow.services.receiver`) runs ``mergeflow-push`` for each
lineage source a verified notification concerns (an MLflow registered model, a Hub repo, an
S3 prefix). It lists that source (complete checkpoints only, the same ids and digests as
watch), drops what the lineage has seen and what a queued or running fold already targets,
and emits the same ``mergeflow.checkpoint.published`` events (:mod:`mergeflow.flows.events`).
The fold flow then folds in publication order across all sources, so a push never reorders
anything; a duplicate notification finds nothing new, and watch stays the safety net.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from mergeflow.flows.events import emit_published
from mergeflow.flows.queue import first_uncovered, order_pending
from mergeflow.flows.watch import active_fold_targets
from mergeflow.tasks.lineage import list_source, load_spec, seen_checkpoints


@flow(name="mergeflow-push", flow_run_name="push-{lineage}-{via}", log_prints=True)
def push_flow(lineage: str, source: str, via: str = "webhook") -> list[str]:
    """Emit published events for the new checkpoints of one of ``lineage``'s sources."""
    spec = load_spec(lineage)
    pending = order_pending([list_source(source)], seen_checkpoints(spec))
    active = active_fold_targets(lineage) if pending else set()
    emitted = []
    for ck in pending[first_uncovered(pending, active) :]:
        emit_published(lineage, ck)
        emitted.append(ck.id)
    get_run_logger().info(
        f"{lineage}: {via} notification for {source}: emitted {', '.join(emitted) or 'nothing'}"
    )
    return emitted
