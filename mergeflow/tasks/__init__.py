"""Prefect tasks: thin wrappers, one core or storage call each; retries only on IO.

- :mod:`mergeflow.tasks.values`: the small frozen values passed between tasks.
- :mod:`mergeflow.tasks.layout`: where a lineage keeps its states and models (plain functions).
- :mod:`mergeflow.tasks.lineage`: load a lineage, its parent state, list sources, seen checkpoints.
- :mod:`mergeflow.tasks.fold`: validate a checkpoint, fold it, export the merged weights.
- :mod:`mergeflow.tasks.evaluate`: score a merged model, apply the gate.
- :mod:`mergeflow.tasks.register`: the MLflow commit point.
"""
