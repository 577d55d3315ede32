"""Maintenance flows: re-evaluate a version, garbage-collect unreferenced storage."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from mergeflow.flows.lock import fence, lineage_lock, reap_crashed_run
from mergeflow.tasks.evaluate import evaluate_model, save_evaluation
from mergeflow.tasks.fold import discard_prefixes
from mergeflow.tasks.lineage import load_spec
from mergeflow.tasks.maintenance import (
    referenced_prefixes,
    registered_versions,
    step_prefixes,
    version_fold,
)
from mergeflow.tasks.values import EvalOutput


@flow(name="mergeflow-reevaluate", flow_run_name="reevaluate-{lineage}-v{version}", log_prints=True)
def reevaluate_flow(lineage: str, version: str) -> EvalOutput:
    """Score a registered version again with the lineage's current suite.

    Writes ``reevaluation-<unix time>.json`` next to the version's state and a table
    artifact in Prefect; the registered version itself is not changed.
    """
    spec = load_spec(lineage)
    fold, model = version_fold(spec, version)
    ev = evaluate_model(spec, fold, model)
    save_evaluation(
        fold.prefix, ev.model_dump(mode="json"), f"reevaluation-{int(time.time())}.json"
    )
    rows = [
        {"task": t, "validation": ev.validation.get(t), "test": ev.test.get(t)} for t in ev.test
    ]
    create_table_artifact(
        rows,
        key=f"reevaluate-{lineage}",
        description=f"{spec.registered_model} version {version}, re-evaluated (test = reported, validation = gate)",
    )
    get_run_logger().info(f"version {version}: test {ev.test}")
    return ev


@flow(
    name="mergeflow-gc",
    flow_run_name="gc-{lineage}",
    log_prints=True,
    on_crashed=[reap_crashed_run],
)
def gc_flow(lineage: str, dry_run: bool = False) -> list[str]:
    """Delete ``<store>/steps/*`` prefixes that no registered version references.

    Holds the lineage's fold lock, so a fold in progress (not registered yet) is never
    collected, and fences it right before deleting (:func:`mergeflow.flows.lock.fence`).
    Returns the deleted (or, with ``dry_run``, deletable) prefixes.
    """
    log = get_run_logger()
    spec = load_spec(lineage)
    with lineage_lock(spec):
        keep = referenced_prefixes(spec, registered_versions(spec))
        present = step_prefixes(spec)
        drop = [p for p in present if p not in keep]
        if not dry_run and drop:
            fence(spec)
            discard_prefixes(drop)
        log.info(
            f"{lineage}: {len(present)} step prefixes, {len(keep)} referenced, {'would delete' if dry_run else 'deleted'} {len(drop)}"
        )
    return drop
