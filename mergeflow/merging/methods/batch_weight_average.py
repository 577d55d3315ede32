"""One-shot weight averaging: the mean of the checkpoints, θ₀ + (1/n)·Σ τ_i."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from mergeflow.merging.methods.base import BatchMethod, MethodParams
from mergeflow.merging.methods.batch_task_arithmetic import sum_in_place


class BatchWeightAverageParams(MethodParams):
    pass


class BatchWeightAverage(BatchMethod[BatchWeightAverageParams]):
    name: ClassVar[str] = "batch_weight_average"
    summary: ClassVar[str] = "one-shot weight averaging: mean of the checkpoints"
    Params = BatchWeightAverageParams

    def merge_tensor(
        self, params: BatchWeightAverageParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        return sum_in_place(taus) / len(taus), 1.0

    def linear_scale(self, params: BatchWeightAverageParams, n: int) -> float:
        return 1.0 / n
