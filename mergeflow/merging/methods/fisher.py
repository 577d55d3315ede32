"""Continual Fisher merging: a per-entry weighted mean of the task vectors by their diagonal Fisher.

Fisher merging (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832) with each
checkpoint's diagonal Fisher ``F_i`` (from its ``mergeflow_stats.safetensors``)::

    θ̄ = θ₀ + Σ c_i (F_i + ε) τ_i / Σ c_i (F_i + ε)

entry by entry, wherever a Fisher exists; the running mean of the task vectors elsewhere.
By default (``normalize: true``, FusionBench's ``normalize_fisher_weight`` default),
``c_i = 1/(‖F_i‖ + ε)`` with the norm over all of the checkpoint's Fisher entries (FusionBench
also divides by ``Σ_j c_j``, a constant that cancels in the ratio: that is what makes the
weights streamable); ``normalize: false`` gives ``c_i = 1``.

The state keeps ``D`` (the weighted mean) and the summed weights ``W = Σ c_i (F_i + ε)``
(slot ``weight``); a fold is ``D_t = (W·D_{t−1} + w_t τ_t)/(W + w_t)``, the batch formula
in any order.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import (
    ContinualMethod,
    Folded,
    MethodParams,
    NoScalars,
    Prepared,
    TensorStep,
    WholeModel,
)
from mergeflow.merging.methods.weight_average import running_mean
from mergeflow.merging.stats import StatKind


class FisherParams(MethodParams):
    min_fisher: float = Field(
        1e-6,
        gt=0.0,
        description="ε added to every Fisher entry (FusionBench's minimal_fisher_weight)",
    )
    normalize: bool = Field(
        True,
        description="weight each checkpoint by 1/(‖F_i‖ + ε), as FusionBench does by default (normalize_fisher_weight)",
    )


class Fisher(ContinualMethod[FisherParams, NoScalars]):
    name: ClassVar[str] = "fisher"
    summary: ClassVar[str] = (
        "continual Fisher merging: task vectors weighted entry by entry by their diagonal "
        "Fisher (needs mergeflow_stats.safetensors); running mean elsewhere"
    )
    Params = FisherParams
    statistics: ClassVar[frozenset[StatKind]] = frozenset({"fisher"})
    slots: ClassVar[tuple[str, ...]] = ("weight",)

    def prepare(self, params: FisherParams, whole: WholeModel) -> Prepared | None:
        """``c = 1/(‖F‖ + ε)`` over the checkpoint's Fisher entries (normalize), else 1."""
        if not params.normalize or whole.stats is None:
            return {"c": 1.0}
        sq = 0.0
        for _, f in whole.stats.iter("fisher"):
            sq += float(torch.linalg.vector_norm(f, dtype=torch.float64)) ** 2
        return {"c": 1.0 / (math.sqrt(sq) + params.min_fisher)}

    def fold_tensor(self, params: FisherParams, s: TensorStep) -> torch.Tensor | Folded:
        """``D_t = (W·D_{t−1} + wτ)/(W + w)``, ``w = c(F + ε)``, with a Fisher; the running mean without."""
        if "fisher" not in s.stats:
            return running_mean(s)
        w = (s.stats["fisher"].to(s.tau.dtype) + params.min_fisher) * s.prepared.get("c", 1.0)
        if s.prev is None or "weight" not in s.extra:
            return Folded(s.tau.clone(), {"weight": w})
        total = s.extra["weight"] + w
        return Folded((s.extra["weight"] * s.prev + w * s.tau) / total, {"weight": total})
