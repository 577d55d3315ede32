"""Continual task arithmetic: θ̄_t = θ̄_{t−1} + s·τ_t (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import ContinualMethod, NoScalars, ScaledParams, TensorStep


class TaskArithmeticParams(ScaledParams):
    scale: float = Field(0.3, description="s: weight of every task vector")


class TaskArithmetic(ContinualMethod[TaskArithmeticParams, NoScalars]):
    name: ClassVar[str] = "task_arithmetic"
    summary: ClassVar[str] = "continual task arithmetic: θ̄_t = θ̄_{t−1} + s·τ_t"
    Params = TaskArithmeticParams

    def fold_tensor(self, params: TaskArithmeticParams, s: TensorStep) -> torch.Tensor:
        """D_t = D_{t−1} + τ_t."""
        return s.tau.clone() if s.prev is None else s.prev + s.tau

    def elementwise(self, params: TaskArithmeticParams, projected: bool) -> bool:
        return True
