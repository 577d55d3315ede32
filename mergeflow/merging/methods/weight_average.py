"""Continual weight averaging: θ̄_t = ((t−1)·θ̄_{t−1} + θ_t)/t (the running mean of the checkpoints)."""

from __future__ import annotations

from typing import ClassVar

import torch

from mergeflow.merging.methods.base import FoldStats, MethodParams, TensorStep, no_prepare


class WeightAverageParams(MethodParams):
    pass


class WeightAverage:
    name: ClassVar[str] = "weight_average"
    summary: ClassVar[str] = "continual weight average: running mean of all folded checkpoints"
    Params = WeightAverageParams
    prepare = staticmethod(no_prepare)

    def fold_tensor(self, params: WeightAverageParams, s: TensorStep) -> torch.Tensor:
        if s.prev is None:
            return s.tau.clone()
        return ((s.step - 1) * s.prev + s.tau) / s.step

    def finish(
        self, params: WeightAverageParams, scalars: dict[str, float], stats: FoldStats
    ) -> tuple[dict[str, float], float]:
        return {}, 1.0
