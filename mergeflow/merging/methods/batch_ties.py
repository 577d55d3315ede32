"""One-shot TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import BatchMethod, MethodParams
from mergeflow.merging.methods.ties import disjoint_merge
from mergeflow.merging.sparsify import tensor_threshold, trim


class BatchTiesParams(MethodParams):
    scale: float = Field(1.0, description="s in θ₀ + s·merged")
    density: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="share of largest-magnitude entries of each task vector kept (per tensor)",
    )
    merge_func: Literal["sum", "mean", "max"] = Field(
        "mean", description="how agreeing entries are combined"
    )


class BatchTies(BatchMethod[BatchTiesParams]):
    name: ClassVar[str] = "batch_ties"
    summary: ClassVar[str] = "one-shot TIES: trim, elect sign, disjoint merge"
    Params = BatchTiesParams

    def merge_tensor(
        self, params: BatchTiesParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        thresholds = [tensor_threshold(t, params.density) for t in taus]
        merged = disjoint_merge(taus, params.merge_func, lambda i, t: trim(t, thresholds[i]))
        return merged, params.scale
