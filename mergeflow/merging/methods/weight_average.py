"""Continual weight averaging: θ̄_t = ((t−1)·θ̄_{t−1} + θ_t)/t (the running mean of the checkpoints)."""

from __future__ import annotations

from typing import ClassVar

import torch

from mergeflow.merging.methods.base import (
    ContinualMethod,
    MethodParams,
    NoScalars,
    TensorStep,
)


def running_mean(s: TensorStep) -> torch.Tensor:
    """D_t = ((t−1)·D_{t−1} + τ_t)/t, the mean task vector (D_1 = τ_1)."""
    if s.prev is None:
        return s.tau.clone()
    return ((s.step - 1) * s.prev + s.tau) / s.step


class WeightAverageParams(MethodParams):
    pass


class WeightAverage(ContinualMethod[WeightAverageParams, NoScalars]):
    name: ClassVar[str] = "weight_average"
    summary: ClassVar[str] = "continual weight average: running mean of all folded checkpoints"
    Params = WeightAverageParams

    def fold_tensor(self, params: WeightAverageParams, s: TensorStep) -> torch.Tensor:
        """D_t = ((t−1)·D_{t−1} + τ_t)/t, the mean task vector."""
        return running_mean(s)

    def elementwise(self, params: WeightAverageParams, projected: bool) -> bool:
        return True
