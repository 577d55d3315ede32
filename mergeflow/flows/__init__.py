"""Prefect flows: watch sources, fold checkpoints, backfill, re-evaluate, garbage-collect.

- :mod:`mergeflow.flows.watch`: ``mergeflow-watch`` (scheduled) emits published events.
- :mod:`mergeflow.flows.fold`: ``mergeflow-fold`` (event-triggered), ``mergeflow-fold-checkpoint``
  (one checkpoint, a subflow), ``mergeflow-backfill``.
- :mod:`mergeflow.flows.maintenance`: ``mergeflow-reevaluate``, ``mergeflow-gc``.
- :mod:`mergeflow.flows.dask`: a fold's tensor groups on a Dask cluster (tasks in :mod:`mergeflow.tasks.dask`).
- :mod:`mergeflow.flows.queue`: pure helpers deciding what a lineage folds next.
- :mod:`mergeflow.flows.deployments`: what ``mergeflow serve`` serves.
"""
