"""MagMax (Marczak et al. 2024, https://arxiv.org/abs/2407.06322): per element keep the task vector of largest magnitude.

τ_max ← τ_t where |τ_t| ≥ |τ_max| (a later checkpoint wins ties); θ̄ = θ₀ + s·τ_max.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import ContinualMethod, NoScalars, ScaledParams, TensorStep


class MagMaxParams(ScaledParams):
    scale: float = Field(0.5, description="s: weight of the max-magnitude task vector")


class MagMax(ContinualMethod[MagMaxParams, NoScalars]):
    name: ClassVar[str] = "magmax"
    summary: ClassVar[str] = (
        "MagMax: keep the largest-magnitude task vector per element, θ̄ = θ₀ + s·τ_max"
    )
    Params = MagMaxParams

    def fold_tensor(self, params: MagMaxParams, s: TensorStep) -> torch.Tensor:
        """D_t = τ_t where |τ_t| ≥ |D_{t−1}|, else D_{t−1}."""
        if s.prev is None:
            return s.tau.clone()
        return torch.where(s.tau.abs() >= s.prev.abs(), s.tau, s.prev)

    def elementwise(self, params: MagMaxParams, projected: bool) -> bool:
        return True
