"""The push flow: what ``watch`` does, for one source, when a registry says something changed.

The webhook receiver (:mod:`mergeflow.services.receiver`) runs ``mergeflow-push`` for each
lineage source a verified notification concerns (an MLflow registered model, a Hub repo, an
S3 prefix). It lists that source (complete checkpoints only, the same ids and digests as
watch), drops what the lineage has seen, and emits the same event as watch for the newest pending
checkpoint unless a queued or running fold covers them (:func:`mergeflow.flows.watch.emit_new`).
The fold flow then folds in publication order across all sources, so a push never reorders
anything; a duplicate notification finds nothing new, and watch stays the safety net.
"""

from __future__ import annotations

from prefect import flow

from mergeflow.flows.queue import order_pending
from mergeflow.flows.watch import emit_new
from mergeflow.tasks.lineage import list_source, load_spec, seen_checkpoints


@flow(name="mergeflow-push", flow_run_name="push-{lineage}-{via}", log_prints=True)
def push_flow(lineage: str, source: str, via: str = "webhook") -> list[str]:
    """Emit the event that folds the new checkpoints of one of ``lineage``'s sources."""
    spec = load_spec(lineage)
    pending = order_pending([list_source(source)], seen_checkpoints(spec))
    return emit_new(lineage, pending, f"{via} notification for {source}")
