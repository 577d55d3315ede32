"""The served deployments: what ``mergeflow serve`` runs from one process.

=========================================  =============================================
``mergeflow-watch/<lineage>``               schedule: the lineage's ``schedule`` (seconds
                                            or cron); emits published events; 1 at a time
                                            (CANCEL_NEW: an overlapping tick is dropped)
``mergeflow-fold/fold``                     trigger: ``mergeflow.checkpoint.published``;
                                            deployment concurrency ``fold_limit`` (ENQUEUE),
                                            plus the per-lineage global limit inside the flow
``mergeflow-backfill/backfill``             manual: fold a list of URIs in order
``mergeflow-reevaluate/reevaluate``         manual: score a version again
``mergeflow-gc/gc``                         manual (or ``--gc-cron``): delete orphans
=========================================  =============================================

Entry points are module paths (``mergeflow.flows.fold:fold_flow``), so runs work from
any working directory of an environment where mergeflow is installed. The same set is
declared for work pools in ``deployments/prefect.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import serve as prefect_serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.types.entrypoint import EntrypointType

from mergeflow.flows.events import fold_trigger
from mergeflow.flows.fold import backfill_flow, fold_flow
from mergeflow.flows.maintenance import gc_flow, reevaluate_flow
from mergeflow.flows.watch import watch_flow
from mergeflow.lineage import LineageSpec

FOLD_DEPLOYMENT = "mergeflow-fold/fold"


def watch_deployment_name(lineage: str) -> str:
    return f"mergeflow-watch/{lineage}"


def _schedule_kwargs(spec: LineageSpec) -> dict[str, Any]:
    return (
        {"interval": spec.schedule} if isinstance(spec.schedule, int) else {"cron": spec.schedule}
    )


def build_deployments(
    lineages: Sequence[LineageSpec], *, fold_limit: int = 2, gc_cron: str | None = None
) -> list[Any]:
    """``RunnerDeployment`` objects for :func:`prefect.serve` (see the module docstring)."""

    module = EntrypointType.MODULE_PATH
    out = [
        watch_flow.to_deployment(
            name=spec.name,
            parameters={"lineage": spec.name},
            paused=False,
            description=f"Watch {', '.join(spec.sources)} for {spec.name}",
            tags=["mergeflow", f"lineage:{spec.name}"],
            # a tick that finds the previous one still running is cancelled, not queued
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            entrypoint_type=module,
            **_schedule_kwargs(spec),
        )
        for spec in lineages
    ]
    out.append(
        fold_flow.to_deployment(
            name="fold",
            triggers=[fold_trigger()],
            paused=False,
            concurrency_limit=ConcurrencyLimitConfig(
                limit=fold_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
            description="Fold a published checkpoint into its lineage (one fold per lineage at a time, in publication order)",
            tags=["mergeflow"],
            entrypoint_type=module,
        )
    )
    out.append(
        backfill_flow.to_deployment(
            name="backfill", paused=False, tags=["mergeflow"], entrypoint_type=module
        )
    )
    out.append(
        reevaluate_flow.to_deployment(
            name="reevaluate", paused=False, tags=["mergeflow"], entrypoint_type=module
        )
    )
    gc_kwargs: dict[str, Any] = {"cron": gc_cron} if gc_cron else {}
    out.append(
        gc_flow.to_deployment(
            name="gc", paused=False, tags=["mergeflow"], entrypoint_type=module, **gc_kwargs
        )
    )
    return out


def serve(
    lineages: Sequence[LineageSpec],
    *,
    fold_limit: int = 2,
    limit: int = 4,
    poll_seconds: float = 2.0,
    gc_cron: str | None = None,
) -> None:
    """Serve every deployment from this process until interrupted (blocking)."""

    deployments = build_deployments(lineages, fold_limit=fold_limit, gc_cron=gc_cron)
    # pause_on_shutdown=False: several serve processes may share the fold deployment, and fold
    # runs triggered while none serves wait as scheduled runs for the next one.
    prefect_serve(
        *deployments,
        limit=limit,
        query_seconds=poll_seconds,
        pause_on_shutdown=False,
        print_starting_message=True,
    )
