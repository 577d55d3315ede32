"""MagMax (Marczak et al. 2024, arXiv:2407.06322): per element keep the task vector of largest magnitude.

τ_max ← τ_t where |τ_t| ≥ |τ_max| (a later checkpoint wins ties); θ̄ = θ₀ + s·τ_max.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import FoldStats, MethodParams, TensorStep, no_prepare


class MagMaxParams(MethodParams):
    scaling_factor: float = Field(0.5, description="s: weight of the max-magnitude task vector")


class MagMax:
    name: ClassVar[str] = "magmax"
    summary: ClassVar[str] = (
        "MagMax: keep the largest-magnitude task vector per element, θ̄ = θ₀ + s·τ_max"
    )
    Params = MagMaxParams
    prepare = staticmethod(no_prepare)

    def fold_tensor(self, params: MagMaxParams, s: TensorStep) -> torch.Tensor:
        if s.prev is None:
            return s.tau.clone()
        return torch.where(s.tau.abs() >= s.prev.abs(), s.tau, s.prev)

    def finish(
        self, params: MagMaxParams, scalars: dict[str, float], stats: FoldStats
    ) -> tuple[dict[str, float], float]:
        return {}, params.scaling_factor
