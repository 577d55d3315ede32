"""Served flow runs start as forks of a warm process, not as fresh interpreters.

``mergeflow serve`` gives Prefect's runner its flow objects (``Runner.add_flow``), and the
runner starts each run with ``prefect.flow_engine.run_flow_in_subprocess``: by default a
``spawn``, a new Python that imports torch, Prefect, MLflow and mergeflow before the run's
first line, 5-9 s on two cores (``benchmarks/latency.py``, phase ``start``), paid again by
every watch tick, fold and backfill. :func:`install` makes it a ``forkserver`` whose server
imports :data:`PRELOAD` once; each run is a fork of that server, with the modules already
loaded. Everything else is Prefect's: the run's environment and settings, its engine, its
signals and cancellation.

The fork is taken from the fork server, which runs no threads and no torch kernels, never
from the serving process itself (forking a process with live threads is unsafe). A module
that fails to preload is imported by the run as before.

The runner pickles the flow for the child. A flow is a module attribute that wraps its
function, so cloudpickle would copy the function by value, with only the globals its body
names: a parameter annotated with a class the body never names (``spec: LineageSpec``
under postponed annotations) then fails Prefect's parameter validation in the child.
:func:`install` therefore pickles mergeflow's own flows by reference (module and name),
which the child imports, already loaded when forked.
"""

from __future__ import annotations

import copyreg
import importlib
import multiprocessing
import sys
import types
from typing import Any, Literal

from prefect import Flow

StartMethod = Literal["forkserver", "spawn"]

PRELOAD = (
    "mergeflow.flows.fold",
    "mergeflow.flows.watch",
    "mergeflow.flows.maintenance",
    "mergeflow.flows.replay",
    "mergeflow.evaluation.evaluators",
    "transformers",
    "safetensors.torch",
)
"""Imported once by the fork server: the flows ``serve`` runs and what their tasks import
lazily (the evaluators' model classes)."""


def flow_by_name(module: str, name: str) -> Flow[Any, Any]:
    """The flow ``name`` of ``module`` (how a pickled mergeflow flow is loaded)."""
    found = getattr(importlib.import_module(module), name)
    if not isinstance(found, Flow):
        raise TypeError(f"{module}.{name} is not a Prefect flow")
    return found


def _reduce_flow(flow: Flow[Any, Any]) -> Any:
    """Pickle a mergeflow flow by module and name; any other flow as Prefect would."""
    module, name = getattr(flow.fn, "__module__", ""), getattr(flow.fn, "__name__", "")
    if module.startswith("mergeflow.") and getattr(sys.modules.get(module), name, None) is flow:
        return flow_by_name, (module, name)
    return flow.__reduce_ex__(4)


def install(method: StartMethod = "forkserver", preload: tuple[str, ...] = PRELOAD) -> None:
    """Start the runs of this process's Prefect runner with ``method`` (call before serving)."""
    import prefect.flow_engine

    copyreg.pickle(Flow, _reduce_flow)
    if method == "spawn":
        prefect.flow_engine.multiprocessing = multiprocessing
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    # Prefect's run_flow_in_subprocess asks its module's ``multiprocessing`` for the "spawn"
    # context; this module-level name is the one place it is looked up.
    prefect.flow_engine.multiprocessing = types.SimpleNamespace(  # type: ignore[assignment]
        get_context=lambda method=None: ctx, context=multiprocessing.context
    )
