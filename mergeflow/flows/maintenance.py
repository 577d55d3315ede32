"""Maintenance flows: re-evaluate a version, garbage-collect unreferenced storage."""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger

from mergeflow.errors import ConfigError
from mergeflow.flows.fold import LOCK_LEASE_S, ensure_fold_lock
from mergeflow.lineage import LineageSpec
from mergeflow.tasks import layout
from mergeflow.tasks.evaluate import evaluate_model
from mergeflow.tasks.io import load_spec, registry
from mergeflow.tasks.models import EvalOutput, FoldOutput, ModelOutput


@flow(name="mergeflow-reevaluate", flow_run_name="reevaluate-{lineage}-v{version}", log_prints=True)
def reevaluate_flow(lineage: str, version: str) -> EvalOutput:
    """Score a registered version again with the lineage's current suite.

    Writes ``reevaluation-<unix time>.json`` next to the version's state and a table
    artifact in Prefect; the registered version itself is not changed.
    """
    from prefect.artifacts import create_table_artifact

    from mergeflow.storage import state_store

    spec = load_spec(lineage)
    v = next(
        (v for v in registry().versions(spec.model_name) if str(v.version) == str(version)), None
    )
    if v is None or not v.model_uri:
        raise ConfigError(f"{spec.model_name} has no version {version} with merged weights")
    manifest = state_store.read_manifest(layout.store(v.state_uri))
    prefix = layout.prefix_of(v.state_uri)
    fold = FoldOutput(
        label="reevaluate",
        params=dict(manifest.info.params),
        prefix=prefix,
        state_uri=v.state_uri,
        step=manifest.info.step,
        folded=tuple(c.id for c in manifest.info.checkpoints),
        seconds=0.0,
        peak_rss_mb=0.0,
    )
    ev = evaluate_model(spec, fold, ModelOutput(model_uri=v.model_uri, seconds=0.0))
    layout.store(prefix).write_bytes(
        f"reevaluation-{int(time.time())}.json",
        json.dumps(ev.model_dump(mode="json"), indent=2).encode(),
    )
    rows = [
        {"task": t, "validation": ev.validation.get(t), "test": ev.test.get(t)} for t in ev.test
    ]
    create_table_artifact(
        rows,
        key=f"reevaluate-{lineage}",
        description=f"{spec.model_name} version {version}, re-evaluated (test = reported, validation = gate)",
    )
    get_run_logger().info(f"version {version}: test {ev.test}")
    return ev


def referenced_prefixes(spec: LineageSpec, versions: list[Any]) -> set[str]:
    """Step prefixes that a registered version uses, directly or through its state's manifest."""
    from mergeflow.storage import state_store

    steps = f"{spec.storage}/steps/"
    keep: set[str] = set()

    def add(uri: str | None) -> None:
        if uri and uri.startswith(steps):
            keep.add(steps + uri[len(steps) :].split("/", 1)[0])

    for v in versions:
        add(v.state_uri)
        add(v.model_uri)
        if v.state_uri:
            try:
                m = state_store.read_manifest(layout.store(v.state_uri))
            except Exception:  # noqa: BLE001 - a version whose state is gone keeps nothing more
                continue
            add(m.tensors)
            for uri in m.heads.values():
                add(uri)
    return keep


@flow(name="mergeflow-gc", flow_run_name="gc-{lineage}", log_prints=True)
def gc_flow(lineage: str, dry_run: bool = False) -> list[str]:
    """Delete ``<storage>/steps/*`` prefixes that no registered version references.

    Holds the lineage's fold lock, so a fold in progress (not registered yet) is never
    collected. Returns the deleted (or, with ``dry_run``, deletable) prefixes.
    """
    from prefect.concurrency.sync import concurrency

    log = get_run_logger()
    spec = load_spec(lineage)
    ensure_fold_lock(spec)
    with concurrency(spec.concurrency_name, occupy=1, strict=True, lease_duration=LOCK_LEASE_S):
        keep = referenced_prefixes(spec, registry().versions(spec.model_name))
        root = layout.store(spec.storage)
        present = sorted(
            {
                f"{spec.storage}/steps/{o.relpath.split('/')[1]}"
                for o in root.list("steps")
                if o.relpath.count("/") >= 2
            }
        )
        drop = [p for p in present if p not in keep]
        for p in drop:
            if not dry_run:
                root.delete_prefix(p[len(spec.storage) + 1 :])
        log.info(
            f"{lineage}: {len(present)} step prefixes, {len(keep)} referenced, {'would delete' if dry_run else 'deleted'} {len(drop)}"
        )
    return drop
