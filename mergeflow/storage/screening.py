"""Screening a checkpoint before it is folded: is it what it claims, and is it sane?

Checks that need more than the safetensors headers, run by the fold flow right after
validation (:func:`mergeflow.tasks.guard.screen_checkpoint`): the checkpoint's
``config.json`` against the base's (:func:`check_config`, JSON only, nothing executed) and
the size of its task vector relative to the base (:func:`task_vector_norms`): a checkpoint
with the base's shapes but trained from another base has a task vector as large as the
weights themselves, ‖τ‖/‖θ₀‖ ≈ 1 or more, while real fine-tunes sit far below 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mergeflow.errors import CheckpointError
from mergeflow.merging.tensors import TensorReader


def check_config(
    base: Mapping[str, Any] | None, checkpoint: Mapping[str, Any] | None, label: str
) -> None:
    """Refuse a checkpoint whose ``config.json`` says it is another architecture than the base.

    Only the JSON is compared; no configuration or model code is ever loaded from a
    checkpoint. A config that needs custom code (``auto_map``, what ``trust_remote_code``
    would run) is refused unless the base declares the same ``auto_map``; a different
    ``model_type`` is refused.
    """
    if not checkpoint:
        return
    base = base or {}
    auto_map = checkpoint.get("auto_map")
    if auto_map and auto_map != base.get("auto_map"):
        raise CheckpointError(
            label,
            "config.json needs custom model code (auto_map, i.e. trust_remote_code) that the base "
            "does not use; mergeflow never runs a checkpoint's code and folds only checkpoints of "
            "the base's architecture",
        )
    mt, bt = checkpoint.get("model_type"), base.get("model_type")
    if mt and bt and mt != bt:
        raise CheckpointError(
            label,
            f"config.json declares model_type {str(mt)[:80]!r} but the base is {str(bt)[:80]!r}",
        )


@dataclass(frozen=True)
class TaskVectorNorms:
    """‖τ‖ and ‖θ₀‖ over the tensors a fold merges (float64 sums)."""

    task_vector: float
    base: float

    @property
    def ratio(self) -> float:
        """‖τ‖/‖θ₀‖ (0 when the base is all zeros and the checkpoint equals it)."""
        if self.base == 0.0:
            return 0.0 if self.task_vector == 0.0 else math.inf
        return self.task_vector / self.base


def task_vector_norms(
    base: TensorReader, checkpoint: TensorReader, keys: Iterable[str]
) -> TaskVectorNorms:
    """Stream ``keys`` once (one tensor pair in memory) and sum ‖θ_t − θ₀‖² and ‖θ₀‖².

    A key the checkpoint lacks counts as a zero task vector. Non-finite values raise
    :class:`CheckpointError` (as the fold would).
    """
    present = set(checkpoint.keys())
    tau_sq = base_sq = 0.0
    for key in keys:
        b = base.get(key).double()
        base_sq += float(b.square().sum())
        if key not in present:
            continue
        t = checkpoint.get(key).double()
        if t.shape != b.shape:
            raise CheckpointError(
                checkpoint.source,
                f"tensor {key!r} has shape {list(t.shape)} but the base has {list(b.shape)}",
            )
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(checkpoint.source, f"tensor {key!r} contains NaN or Inf values")
        tau_sq += float((t - b).square().sum())
    return TaskVectorNorms(math.sqrt(tau_sq), math.sqrt(base_sq))
