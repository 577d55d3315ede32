"""Prefect flows: watch sources, fold checkpoints, backfill, re-evaluate, garbage-collect.

- :mod:`mergeflow.flows.watch`: ``mergeflow-watch`` (scheduled) emits published events.
- :mod:`mergeflow.flows.fold`: ``mergeflow-fold`` (event-triggered), ``mergeflow-fold-checkpoint``
  (one checkpoint, a subflow), ``mergeflow-backfill``.
- :mod:`mergeflow.flows.maintenance`: ``mergeflow-reevaluate``, ``mergeflow-gc``.
- :mod:`mergeflow.flows.dask_fold`: the per-tensor fold spread over a Dask cluster.
- :mod:`mergeflow.flows.deployments`: what ``mergeflow serve`` serves.
"""
