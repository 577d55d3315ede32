"""One-shot task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089): θ₀ + s·Σ τ_i."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import BatchMethod, MethodParams


def sum_in_place(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ τ_i accumulated into ``taus[0]`` (the method's own, see ``BatchMethod.merge_tensor``):
    no stacked copy and no new tensor."""
    out = taus[0]
    for t in taus[1:]:
        out += t
    return out


class BatchTaskArithmeticParams(MethodParams):
    scale: float = Field(0.3, description="s in θ₀ + s·Σ τ_i")


class BatchTaskArithmetic(BatchMethod[BatchTaskArithmeticParams]):
    name: ClassVar[str] = "batch_task_arithmetic"
    summary: ClassVar[str] = "one-shot task arithmetic: θ₀ + s·Σ τ_i"
    Params = BatchTaskArithmeticParams

    def merge_tensor(
        self, params: BatchTaskArithmeticParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        return sum_in_place(taus), params.scale

    def linear_scale(self, params: BatchTaskArithmeticParams, n: int) -> float:
        return params.scale
