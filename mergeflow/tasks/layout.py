"""Where a lineage keeps its states, models and evaluations (plain functions, no Prefect).

Under the lineage's ``store`` prefix::

    init/state/                   step-0 state (created on the first fold)
    init/<method>/state/          step-0 state of another candidate method (a portfolio)
    steps/<NNNN>-<id>/state/      a fold's new state (fresh prefix per attempt)
    steps/<NNNN>-<id>/model/      its merged weights, HF layout (config.json + safetensors)
    steps/<NNNN>-<id>/evaluation.json   its scores and the test accuracy matrix of its chain

``NNNN`` is the state step (t of θ̄_t) and ``<id>`` a random suffix, so a retried or
concurrent attempt never overwrites a committed one; candidates add ``-<label>``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mergeflow.errors import StateError
from mergeflow.evaluation.continual import AccuracyMatrix
from mergeflow.lineage import LineageSpec
from mergeflow.storage import schemes
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.objects import ObjectStore

EVALUATION_FILE = "evaluation.json"


def open_base(spec: LineageSpec) -> OpenedCheckpoint:
    return schemes.open_checkpoint(spec.base, allow_pickle=spec.allow_pickle)


def init_prefix(spec: LineageSpec) -> str:
    return f"{spec.store}/init"


def init_state_uri(spec: LineageSpec, method: str | None = None) -> str:
    """The step-0 state of a method's chain: ``init/state`` (the lineage's method) or
    ``init/<method>/state`` (another candidate method of a portfolio)."""
    if method in (None, spec.method):
        return state_uri_of(init_prefix(spec))
    return state_uri_of(f"{init_prefix(spec)}/{method}")


def state_uri_of(prefix: str) -> str:
    return f"{prefix}/state"


def model_uri_of(prefix: str) -> str:
    return f"{prefix}/model"


def prefix_of(state_uri: str) -> str:
    """The step prefix holding a state (``…/steps/0003-ab12cd34`` for ``…/state``)."""
    if not state_uri.endswith("/state"):
        raise StateError(f"{state_uri} is not a lineage state URI (expected …/state)")
    return state_uri[: -len("/state")]


def new_prefix(spec: LineageSpec, step: int, label: str | None = None) -> str:
    """A fresh prefix for one fold attempt."""
    tail = f"-{_safe(label)}" if label and label != "main" else ""
    return f"{spec.store}/steps/{step:04d}-{uuid.uuid4().hex[:8]}{tail}"


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:40]


def store(uri: str) -> ObjectStore:
    return schemes.open_store(uri)


def read_uri(uri: str) -> bytes:
    """Bytes of one object given by a full URI (local path, s3://, hf://)."""
    try:
        return schemes.read_uri(uri)
    except FileNotFoundError:
        raise StateError(f"{uri} does not exist") from None


def write_evaluation(prefix: str, doc: dict[str, Any], name: str = EVALUATION_FILE) -> None:
    store(prefix).write_bytes(name, json.dumps(doc, indent=2, sort_keys=True).encode())


def read_evaluation(prefix: str) -> tuple[AccuracyMatrix, dict[str, float], dict[str, float]]:
    """(test matrix of the chain, validation scores, test scores) saved with a step; empty at init."""
    s = store(prefix)
    if not s.exists(EVALUATION_FILE):
        return AccuracyMatrix(), {}, {}
    doc = json.loads(s.read_bytes(EVALUATION_FILE))
    return (
        AccuracyMatrix.model_validate(doc.get("matrix") or {}),
        dict(doc.get("validation") or {}),
        dict(doc.get("test") or {}),
    )
