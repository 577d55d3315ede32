"""A fold whose tensor groups run on a Dask cluster (prefect-dask's DaskTaskRunner).

The work is in :mod:`mergeflow.tasks.dask`; this flow only orchestrates it. Use the
lineage's ``dask.address`` for an existing cluster (``tcp://scheduler:8786``); otherwise a
``LocalCluster`` on 127.0.0.1 with ``n_workers`` workers (processes or threads) and no
dashboard is started for the run and closed after it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from mergeflow.lineage import DaskSpec, LineageSpec
from mergeflow.tasks.dask import commit_groups, fold_group, plan_groups
from mergeflow.tasks.values import CheckpointRef, FoldOutput, ParentState


def task_runner(d: DaskSpec) -> Any:
    """The DaskTaskRunner for a lineage's ``dask`` settings (loopback only for a local cluster)."""
    from prefect_dask import DaskTaskRunner  # prefect-dask only when a lineage asks for it

    if d.address:
        return DaskTaskRunner(address=d.address)
    kwargs: dict[str, Any] = {
        "n_workers": d.n_workers,
        "processes": d.processes,
        "threads_per_worker": 1,
        "dashboard_address": None,
    }
    if d.processes:  # worker processes talk TCP: loopback only (threads use in-process transport)
        kwargs["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=kwargs)


@flow(name="mergeflow-dask-fold", flow_run_name="dask-fold-{ck.id}-{label}")
def _dask_fold(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    label: str,
    params: dict[str, Any],
    prefix: str,
    method: str | None = None,
) -> FoldOutput:
    plan = plan_groups(spec, parent, ck, params, prefix, method)
    parts = [fold_group.submit(spec, ck, plan, i) for i in range(len(plan.groups))]
    return commit_groups(spec, ck, plan, [p.result() for p in parts], label, prefix)


def dask_fold(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    label: str,
    params: dict[str, Any],
    prefix: str,
    method: str | None = None,
) -> FoldOutput:
    """Fold ``ck`` into ``parent`` on the lineage's Dask cluster; same result as the fold task."""
    assert spec.dask is not None
    runner = _dask_fold.with_options(task_runner=task_runner(spec.dask))
    return runner(spec, parent, ck, label, params, prefix, method)
