"""The served deployments: what ``mergeflow serve`` runs from one process.

=========================================  =============================================
``mergeflow-watch/<schedule>``              one per distinct ``schedule`` of the served
                                            lineages (``every-30s``, ``cron-*~5_*_*_*_*``):
                                            watches all of them in one run, emits their
                                            published events; 1 at a time (CANCEL_NEW: an
                                            overlapping tick is dropped)
``mergeflow-fold/<lineage>``                trigger: ``mergeflow.checkpoint.published`` of
                                            that lineage; deployment concurrency 1 (ENQUEUE)
``mergeflow-fold/fold``                     trigger: the same event of every lineage this
                                            process does not serve by name; deployment
                                            concurrency ``fold_limit`` (ENQUEUE)
``mergeflow-backfill/backfill``             manual: fold a list of URIs in order
``mergeflow-reevaluate/reevaluate``         manual: score a version again
``mergeflow-gc/gc``                         manual (or ``--gc-cron``): delete orphans
``mergeflow-replay/replay``                 manual: drop a checkpoint, replay what followed it
``mergeflow-rebuild/rebuild``               manual: refold a lineage's checkpoints (another method)
=========================================  =============================================

**Concurrency.** Each served lineage has its own fold deployment with one slot, so its
queued fold runs wait on the Prefect server (``AwaitingConcurrencySlot``), holding no
process and no slot another lineage needs: a lineage whose fold is slow, or crashed, delays
no other lineage (the old single fold deployment let one lineage's waiting runs take every
slot). Prefect frees a deployment slot as soon as the run ends, Crashed included. Inside
the flow the lineage lock (:mod:`mergeflow.flows.lock`) serialises folds with manual
backfill and gc runs, and one of ``fold_limit`` slots of the global limit ``mergeflow-folds``
caps folds across lineages (memory). Run one ``serve`` per Prefect server: the shared
``mergeflow-fold/fold`` deployment's trigger lists the lineages served by name, and a second
process serving other lineages would overwrite it.

Entry points are module paths (``mergeflow.flows.fold:fold_flow``), so runs work from
any working directory of an environment where mergeflow is installed. The same set is
declared for work pools in ``deployments/prefect.yaml``. ``serve`` runs them from its own
flow objects, each run a fork of a warm fork server (:mod:`mergeflow.flows.warmstart`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.types.entrypoint import EntrypointType

from mergeflow.errors import ServiceUnavailable
from mergeflow.flows.events import fold_trigger
from mergeflow.flows.fold import backfill_flow, fold_flow
from mergeflow.flows.lock import ensure_fold_slots
from mergeflow.flows.maintenance import gc_flow, reevaluate_flow
from mergeflow.flows.replay import rebuild_flow, replay_flow
from mergeflow.flows.warmstart import StartMethod, install
from mergeflow.flows.watch import watch_flow
from mergeflow.lineage import LineageSpec

FOLD_DEPLOYMENT = "mergeflow-fold/fold"
"""The shared fold deployment: lineages no running ``serve`` serves by name (``fold-shared``
when a served lineage is itself named ``fold``)."""


def fold_deployment_name(lineage: str) -> str:
    """The fold deployment of a lineage that ``serve`` serves by name."""
    return f"mergeflow-fold/{lineage}"


def watch_deployment_name(schedule: int | str) -> str:
    """The watch deployment of the served lineages whose ``schedule`` is this one."""
    if isinstance(schedule, int):
        return f"mergeflow-watch/every-{schedule}s"
    # Deployment names may not hold "/": it becomes "~", and spaces "_" (one name per cron)
    return "mergeflow-watch/cron-" + re.sub(r"\s+", "_", schedule.strip()).replace("/", "~")


def _schedule_kwargs(schedule: int | str) -> dict[str, Any]:
    return {"interval": schedule} if isinstance(schedule, int) else {"cron": schedule}


def _by_schedule(lineages: Sequence[LineageSpec]) -> dict[int | str, list[str]]:
    """Lineage names grouped by schedule, in the order given."""
    groups: dict[int | str, list[str]] = {}
    for spec in lineages:
        groups.setdefault(spec.schedule, []).append(spec.name)
    return groups


def deployment_args(
    lineages: Sequence[LineageSpec], *, fold_limit: int = 2, gc_cron: str | None = None
) -> list[tuple[Flow[Any, Any], dict[str, Any]]]:
    """Each served flow with its deployment's arguments (``Flow.to_deployment``,
    ``Runner.add_flow``; see the module docstring)."""

    module = EntrypointType.MODULE_PATH
    common: dict[str, Any] = {"paused": False, "entrypoint_type": module}
    # One watch run per schedule, not per lineage: each run is a process.
    out: list[tuple[Flow[Any, Any], dict[str, Any]]] = [
        (
            watch_flow,
            {
                "name": watch_deployment_name(schedule).split("/", 1)[1],
                "parameters": {"lineages": names},
                "description": f"Watch the sources of {', '.join(names)}",
                "tags": ["mergeflow", *(f"lineage:{name}" for name in names)],
                # a tick that finds the previous one still running is cancelled, not queued
                "concurrency_limit": ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
                **common,
                **_schedule_kwargs(schedule),
            },
        )
        for schedule, names in _by_schedule(lineages).items()
    ]
    enqueue = ConcurrencyLimitStrategy.ENQUEUE
    out += [
        (
            fold_flow,
            {
                "name": spec.name,
                "triggers": [fold_trigger(spec.name)],
                "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=enqueue),
                "description": f"Fold checkpoints published for {spec.name}, one run at a time, in publication order",
                "tags": ["mergeflow", f"lineage:{spec.name}"],
                **common,
            },
        )
        for spec in lineages
    ]
    shared = "fold" if all(spec.name != "fold" for spec in lineages) else "fold-shared"
    out.append(
        (
            fold_flow,
            {
                "name": shared,
                "triggers": [fold_trigger(exclude=[spec.name for spec in lineages])],
                "concurrency_limit": ConcurrencyLimitConfig(
                    limit=fold_limit, collision_strategy=enqueue
                ),
                "description": "Fold a published checkpoint of a lineage not served by name (one fold per lineage at a time, in publication order)",
                "tags": ["mergeflow"],
                **common,
            },
        )
    )
    manual: list[tuple[Flow[Any, Any], str]] = [
        (backfill_flow, "backfill"),
        (reevaluate_flow, "reevaluate"),
        (replay_flow, "replay"),
        (rebuild_flow, "rebuild"),
    ]
    out += [(f, {"name": name, "tags": ["mergeflow"], **common}) for f, name in manual]
    gc_kwargs: dict[str, Any] = {"cron": gc_cron} if gc_cron else {}
    out.append((gc_flow, {"name": "gc", "tags": ["mergeflow"], **common, **gc_kwargs}))
    return out


def build_deployments(
    lineages: Sequence[LineageSpec], *, fold_limit: int = 2, gc_cron: str | None = None
) -> list[Any]:
    """The ``RunnerDeployment`` objects of :func:`deployment_args`."""
    return [
        f.to_deployment(**kwargs)
        for f, kwargs in deployment_args(lineages, fold_limit=fold_limit, gc_cron=gc_cron)
    ]


def make_runner(limit: int, poll_seconds: float) -> Runner:
    """The Prefect runner of ``serve``: ``limit`` runs at once, polling every ``poll_seconds``.

    It claims a scheduled run (and so its deployment's concurrency slot) at most one poll
    before the run is due (``prefetch_seconds``). With Prefect's default of 10 s a watch tick
    held the watch's single slot for 10 s before it started, so at a 5 s interval two of every
    three ticks were cancelled (``CANCEL_NEW``) and detection waited 10-15 s instead of up to 5
    (``benchmarks/latency.py`` counts the ticks). ``pause_on_shutdown=False``: several serve
    processes may share the fold deployment, and fold runs triggered while none serves wait as
    scheduled runs for the next one.
    """
    return Runner(
        limit=limit,
        query_seconds=poll_seconds,
        prefetch_seconds=poll_seconds,
        pause_on_shutdown=False,
    )


def serve(
    lineages: Sequence[LineageSpec],
    *,
    fold_limit: int = 2,
    limit: int = 4,
    poll_seconds: float = 2.0,
    gc_cron: str | None = None,
    start: StartMethod = "forkserver",
) -> None:
    """Serve every deployment from this process until interrupted (blocking).

    Each flow is added to Prefect's runner with its flow object (``Runner.add_flow``), so a
    run starts from that object in a child process (``start``, :mod:`mergeflow.flows.warmstart`)
    rather than from a fresh ``python -m prefect.engine`` that imports the entrypoint again.
    """

    install(start)
    ensure_fold_slots(fold_limit)
    runner = make_runner(limit, poll_seconds)
    names = []
    for f, kwargs in deployment_args(lineages, fold_limit=fold_limit, gc_cron=gc_cron):
        runner.add_flow(f, **kwargs)
        names.append(f"{f.name}/{kwargs['name']}")
    print(f"serving {len(names)} deployments ({start}): {', '.join(names)}", flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        print(f"{type(exc).__name__}: shutting down", flush=True)


def _trigger_key(trigger: Any) -> str:
    """What makes two fold triggers equal: the events they expect and match."""
    dumped = trigger.model_dump(mode="json")
    return json.dumps(
        {k: dumped.get(k) for k in ("expect", "match", "match_related")}, sort_keys=True
    )


def missing_fold_triggers(lineages: Sequence[LineageSpec]) -> list[str]:
    """The fold triggers that ``serve(lineages)`` creates and the Prefect server lacks so far.

    An event emitted before its trigger exists starts no run (a watch tick emits it again,
    an event sent by hand is lost), so callers wait for this to be empty.
    """
    shared = fold_trigger(exclude=[spec.name for spec in lineages])
    expected = [fold_trigger(spec.name) for spec in lineages] + [shared]
    missing: list[str] = []
    with get_client(sync_client=True) as client:
        for trigger in expected:
            found = client.read_automations_by_name(trigger.name)
            if not any(
                a.enabled and _trigger_key(a.trigger) == _trigger_key(trigger) for a in found
            ):
                missing.append(trigger.name)
    return missing


def wait_until_served(lineages: Sequence[LineageSpec], timeout: float = 180.0) -> None:
    """Block until a starting ``serve(lineages)`` has created its fold triggers."""
    deadline = time.monotonic() + timeout
    while missing := missing_fold_triggers(lineages):
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"mergeflow serve created no trigger {', '.join(missing)} within {timeout:.0f} s; "
                "see its log (`mergeflow status`)"
            )
        time.sleep(1.0)
