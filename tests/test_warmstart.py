"""Served runs start as forks of a warm fork server (``mergeflow serve --start``), on the REAL
Prefect server: Prefect's own ``run_flow_in_subprocess`` starts a flow run after
``warmstart.install``, and the run reports what its process had imported before its first
line and who its parent is. ``spawn`` (Prefect's own) is the control."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prefect import flow

from mergeflow.flows import warmstart

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.services]

MARKER = "helpers.start_marker"  # preloaded by the test's fork server only


@flow(name="mergeflow-test-start")
def report_start(path: str) -> None:
    """Write which modules this run found imported (and who imported the marker), its pids."""
    seen = {m: m in sys.modules for m in (MARKER, "torch")}
    marker = getattr(sys.modules.get(MARKER), "IMPORTED_BY", None)
    Path(path).write_text(
        json.dumps({"seen": seen, "marker": marker, "ppid": os.getppid(), "pid": os.getpid()})
    )


def _start_run(method: warmstart.StartMethod, out: Path) -> dict[str, Any]:
    import prefect.flow_engine

    warmstart.install(method, preload=("torch", MARKER))
    try:
        proc = prefect.flow_engine.run_flow_in_subprocess(
            report_start, parameters={"path": str(out)}
        )
        proc.join(timeout=180)
        assert proc.exitcode == 0, f"{method} run exited {proc.exitcode}"
    finally:
        warmstart.install("spawn")
    return dict(json.loads(out.read_text()))


def test_forkserver_runs_start_with_the_preloaded_modules_spawn_runs_without(
    stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fork server is a fresh interpreter that imports the preload by name before any
    # sys.path change of this process reaches it: it finds tests/helpers through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    fork = _start_run("forkserver", tmp_path / "fork.json")
    assert fork["seen"] == {MARKER: True, "torch": True}
    assert fork["ppid"] != os.getpid()  # a child of the fork server, not of this process
    assert fork["marker"] == fork["ppid"]  # imported once, by the fork server
    again = _start_run("forkserver", tmp_path / "again.json")
    assert again["ppid"] == fork["ppid"] and again["pid"] != fork["pid"]  # one server, forked
    spawn = _start_run("spawn", tmp_path / "spawn.json")
    assert spawn["seen"][MARKER] is False and spawn["marker"] is None
    assert spawn["ppid"] == os.getpid()


def test_mergeflow_flows_pickle_by_reference_other_flows_by_value() -> None:
    """The runner pickles the flow for the child: mergeflow's own load by module and name (so
    annotations resolve in their module), any other flow is copied as before."""
    import cloudpickle

    from mergeflow.flows.fold import fold_flow, fold_one

    warmstart.install("spawn")
    assert cloudpickle.loads(cloudpickle.dumps(fold_flow)) is fold_flow
    assert cloudpickle.loads(cloudpickle.dumps(fold_one)) is fold_one
    copied = cloudpickle.loads(cloudpickle.dumps(report_start))
    assert copied is not report_start and copied.name == report_start.name
    with pytest.raises(
        TypeError, match="mergeflow.flows.fold.pending_checkpoints is not a Prefect flow"
    ):
        warmstart.flow_by_name("mergeflow.flows.fold", "pending_checkpoints")
