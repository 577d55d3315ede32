"""Continual task arithmetic: θ̄_t = θ̄_{t−1} + s·τ_t (Ilharco et al. 2023, arXiv:2212.04089)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import FoldStats, MethodParams, TensorStep, no_prepare


class TaskArithmeticParams(MethodParams):
    scaling_factor: float = Field(0.3, description="s: weight of every task vector")


class TaskArithmetic:
    name: ClassVar[str] = "task_arithmetic"
    summary: ClassVar[str] = "continual task arithmetic: θ̄_t = θ̄_{t−1} + s·τ_t"
    Params = TaskArithmeticParams
    prepare = staticmethod(no_prepare)

    def fold_tensor(self, params: TaskArithmeticParams, s: TensorStep) -> torch.Tensor:
        return s.tau.clone() if s.prev is None else s.prev + s.tau

    def finish(
        self, params: TaskArithmeticParams, scalars: dict[str, float], stats: FoldStats
    ) -> tuple[dict[str, float], float]:
        return {}, params.scaling_factor
