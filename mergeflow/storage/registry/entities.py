"""MLflow entities built from a fold record: dataset inputs, linked metrics, the MLmodel file."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModel, Metric
from mlflow.models.model import MLMODEL_FILE_NAME, Model

from mergeflow.storage.registry.records import FoldRecord, finite_metrics
from mergeflow.storage.registry.tags import (
    MLFLOW_EXTERNAL,
    T_MODEL_URI,
    TEST_AVG,
    TEST_BWT,
    TEST_PREFIX,
)

__all__ = ["dataset_inputs", "linked_metrics", "write_mlmodel"]


def dataset_inputs(rec: FoldRecord) -> tuple[list[DatasetInput], dict[str, tuple[str, str]]]:
    """DatasetInputs for ``log_inputs`` and task name -> (dataset name, digest) for metrics."""
    inputs, by_name = [], {}
    for d in rec.eval_datasets:
        name = str(d.get("name") or d.get("uri") or "dataset")[:500]
        uri = str(d.get("uri", ""))
        split = str(d.get("split", "test"))
        digest = str(d.get("digest") or "")
        digest = digest.split(":", 1)[-1] if digest else hashlib.sha256(uri.encode()).hexdigest()
        digest = digest[:32]  # MLflow keeps 36 characters
        source_type = urlparse(uri).scheme or "local"
        dataset = Dataset(
            name=name,
            digest=digest,
            source_type=source_type if len(source_type) > 1 else "local",
            source=json.dumps({"uri": uri}),
            profile=json.dumps({"split": split}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
        if split == "test":
            by_name[name] = (name, digest)
    return inputs, by_name


def linked_metrics(
    rec: FoldRecord, model_id: str, by_task: dict[str, tuple[str, str]]
) -> list[Metric]:
    """The finite metrics at ``rec.step``, linked to the LoggedModel; ``test/<task>`` to its dataset."""
    now = int(time.time() * 1000)
    metrics = []
    for key, value in finite_metrics(rec.metrics).items():
        per_task = key.startswith(TEST_PREFIX) and key not in (TEST_AVG, TEST_BWT)
        ds = by_task.get(key.removeprefix(TEST_PREFIX)) if per_task else None
        metrics.append(
            Metric(
                key,
                value,
                now,
                rec.step,
                model_id=model_id,
                dataset_name=ds[0] if ds else None,
                dataset_digest=ds[1] if ds else None,
            )
        )
    return metrics


def write_mlmodel(folder: Path, model: LoggedModel) -> None:
    """The MLmodel file MLflow writes for external models (what ``create_external_model`` does)."""
    Model(
        artifact_path=model.artifact_location,
        model_uuid=model.model_id,
        model_id=model.model_id,
        run_id=model.source_run_id,
        metadata={MLFLOW_EXTERNAL: True, T_MODEL_URI: model.tags.get(T_MODEL_URI, "")},
    ).save(str(folder / MLMODEL_FILE_NAME))
