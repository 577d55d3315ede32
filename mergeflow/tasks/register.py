"""The commit point: register a fold (or a rejected checkpoint) as an MLflow model version."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergeflow.evaluation.continual import AccuracyMatrix
from mergeflow.storage.registry import FoldRecord, VersionRecord
from mergeflow.tasks.lineage import registry
from mergeflow.tasks.retry import io_task


def matrix_rows(matrix: AccuracyMatrix) -> tuple[list[list[float | None]], list[str]]:
    """``a_i(θ̄_j)`` as rows (tasks) x columns (steps), None where a task was not scored yet."""
    rows = [[matrix.values[j].get(name) for j in range(matrix.t)] for name in matrix.tasks]
    return rows, list(matrix.tasks)


@task(name="register-version", **io_task)
def register_fold(record: dict[str, Any]) -> VersionRecord:
    """``Registry.register_fold``: one MLflow run + model version; idempotent per digest."""
    return registry().register_fold(FoldRecord(**record))


@task(name="record-rejection", **io_task)
def record_rejection(record: dict[str, Any]) -> VersionRecord:
    """``Registry.record_rejection``: a checkpoint that failed validation, never retried."""
    return registry().record_rejection(FoldRecord(**record))
