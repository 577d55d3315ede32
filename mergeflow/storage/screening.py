"""Screening a checkpoint before it is folded: is it what it claims?

The check beyond the safetensors headers that reads no tensor, run by the fold flow right
after validation (:func:`mergeflow.tasks.guard.screen_checkpoint`): the checkpoint's
``config.json`` against the base's (:func:`check_config`, JSON only, nothing executed). The
size of its task vector relative to the base is checked by the fold itself, from the norms
it sums while reading (:func:`mergeflow.merging.engine.check_task_vector_ratio`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergeflow.errors import CheckpointError


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
