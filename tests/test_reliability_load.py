"""Load: many lineages folding at once through ``mergeflow serve``, on SQLite and on PostgreSQL.

``MERGEFLOW_LOAD_LINEAGES`` x ``MERGEFLOW_LOAD_CHECKPOINTS`` (default 10 x 10) tiny
checkpoints are published at once; one ``serve`` process serves every lineage. Checked: each
lineage ends with exactly its checkpoints, once each, in publication order, every version
on the one before (no lost or doubled fold); no "database is locked" in any log, on
SQLite as on PostgreSQL; no fold run left unfinished. ``MERGEFLOW_LOAD_SERVE_ARGS``
adds arguments to ``mergeflow serve`` (e.g. ``--limit 2``). Printed: throughput, where a fold's time goes, and how long runs waited to
start (the first bottleneck). ``reliability`` tier (``scripts/reliability.sh``); CI runs 3 x 3
fold runs in threads of one process.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import start_serve
from test_reliability_once import assert_chain, make_lineage, publish_burst


def _runs(names: set[str]) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        out = []
        offset = 0
        while True:
            page = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["mergeflow-fold"])),
                limit=200,
                offset=offset,
            )
            out += [r for r in page if (r.parameters or {}).get("lineage") in names]
            if len(page) < 200:
                return out
            offset += 200


@pytest.mark.reliability
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("profile", ["embedded", "postgres"])
def test_many_lineages_fold_at_once(
    profile: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from mergeflow.storage.registry import Registry

    running = request.getfixturevalue("stack" if profile == "embedded" else "postgres_stack")
    n_lin = int(os.environ.get("MERGEFLOW_LOAD_LINEAGES", "10"))
    n_ck = int(os.environ.get("MERGEFLOW_LOAD_CHECKPOINTS", "10"))
    tag = uuid.uuid4().hex[:6]
    specs = [
        make_lineage(
            tmp_path / f"l{i}",
            f"load{i}-{tag}",
            f"s3://{running.bucket}/load-{tag}/{i}",
            schedule=30,
        )
        for i in range(n_lin)
    ]
    name = f"serve-load-{tag}"
    serve_args = os.environ.get("MERGEFLOW_LOAD_SERVE_ARGS", "").split()  # e.g. --limit 2
    log = start_serve(running.stack, name, specs, *serve_args)
    reg = Registry()
    try:
        t0 = time.monotonic()
        ids = {
            spec.name: publish_burst(tmp_path / f"l{i}" / "pub", n_ck)
            for i, spec in enumerate(specs)
        }
        deadline = t0 + float(os.environ.get("MERGEFLOW_LOAD_TIMEOUT", "5400"))
        done: dict[str, int] = {}
        while time.monotonic() < deadline:
            done = {s.name: len(reg.versions(s.registered_model)) for s in specs}
            if all(v >= n_ck for v in done.values()):
                break
            time.sleep(5)
        elapsed = time.monotonic() - t0
        assert all(v >= n_ck for v in done.values()), f"after {elapsed:.0f} s: {done}"
        versions = {s.name: assert_chain(s.registered_model, ids[s.name]) for s in specs}
        # every fold run ends (none stuck Running/Pending), then look at them
        names = {s.name for s in specs}
        # duplicate fold runs (a watch tick re-emits after a gap) drain one slot wait (30 s)
        # and one process start each after the last fold: 300 s was too short at 10 x 10
        end = time.monotonic() + 900
        while time.monotonic() < end:
            runs = _runs(names)
            if all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(5)
        stuck = [(r.name, r.state_type) for r in runs if r.state is None or not r.state.is_final()]
        assert not stuck, stuck
        logs = [log, *running.stack.run_dir.glob("*.log")]
        locked = sum(p.read_text(errors="replace").count("database is locked") for p in logs)
        # SQLite too: the embedded Prefect server begins its transactions IMMEDIATE
        # (mergeflow/services/prefect_sqlite.py), so contending writers wait, not fail
        assert locked == 0, f'"database is locked" {locked} times'
        waits = sorted(
            (r.start_time - r.expected_start_time).total_seconds()
            for r in runs
            if r.start_time and r.expected_start_time
        )
        flat = [v for vs in versions.values() for v in vs]

        def median(key: str) -> float:
            return statistics.median(v.metrics.get(key, 0.0) for v in flat)

        print(
            f"RELIABILITY load ({profile}): {n_lin} lineages x {n_ck} checkpoints = {len(flat)} "
            f"folds in {elapsed:.0f} s ({len(flat) / elapsed * 60:.1f} folds/min), 0 lost, 0 doubled, "
            f"{locked} 'database is locked' in the server logs, 0 stuck; {len(runs)} fold runs ("
            f"{sum(1 for r in runs if r.state_type and r.state_type.value == 'COMPLETED')} completed); "
            f"per fold (median s): load {median('load_seconds'):.2f}, fold {median('fold_seconds'):.2f}, "
            f"export {median('export_seconds'):.2f}; run start delay (s): median "
            f"{statistics.median(waits) if waits else 0:.0f}, p90 {waits[int(0.9 * (len(waits) - 1))] if waits else 0:.0f}; "
            f"runner at capacity {log.read_text(errors='replace').count('(at capacity)')} polls"
        )
    finally:
        running.stack.stop_process(name)


@pytest.mark.services
@pytest.mark.slow
def test_lineages_folding_at_once_in_one_process(stack: Any, tmp_path: Path) -> None:
    """The CI version: 3 lineages x 3 checkpoints, every fold run started at once in threads
    of this process against the session stack (SQLite Prefect and MLflow)."""
    from test_reliability_once import run_all

    from mergeflow.flows.fold import fold_flow

    tag = uuid.uuid4().hex[:6]
    specs = [make_lineage(tmp_path / f"l{i}", f"ci-load{i}-{tag}") for i in range(3)]
    ids = {s.name: publish_burst(tmp_path / f"l{i}" / "pub", 3) for i, s in enumerate(specs)}

    def locked() -> int:
        return sum(
            p.read_text(errors="replace").count("database is locked")
            for p in stack.stack.run_dir.glob("*.log")
        )

    before = locked()
    t0 = time.monotonic()
    run_all([(lambda s=s, c=c: fold_flow(s.name, c)) for s in specs for c in ids[s.name]])
    elapsed = time.monotonic() - t0
    for s in specs:  # no lost, doubled or reordered fold, parent chain unbroken
        assert_chain(s.registered_model, ids[s.name])
    new_locks = locked() - before  # the session stack's logs are shared: count what this added
    print(
        f"RELIABILITY load (CI, in-process): 3 lineages x 3 checkpoints in {elapsed:.0f} s, "
        f"{new_locks} 'database is locked' in the server logs"
    )
    assert new_locks == 0
