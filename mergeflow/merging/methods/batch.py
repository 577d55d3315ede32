"""One-shot (batch) methods for comparisons: task arithmetic, TIES, DARE, averaging.

Each merges the task vectors of one tensor from all checkpoints at once; the merged
tensor is ``θ₀ + c·D``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import MethodParams
from mergeflow.merging.methods.ties import disjoint_merge
from mergeflow.merging.sparsify import tensor_threshold, trim


def _sum(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in place: one extra tensor instead of a stacked copy of all of them."""
    out = taus[0].clone()
    for t in taus[1:]:
        out += t
    return out


class BatchTaskArithmeticParams(MethodParams):
    scaling_factor: float = Field(0.3, description="s in θ₀ + s·Σ τ_i")


class BatchTaskArithmetic:
    name: ClassVar[str] = "batch_task_arithmetic"
    summary: ClassVar[str] = "one-shot task arithmetic: θ₀ + s·Σ τ_i"
    Params = BatchTaskArithmeticParams

    def merge_tensor(
        self, params: BatchTaskArithmeticParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        return _sum(taus), params.scaling_factor


class BatchTiesParams(MethodParams):
    scaling_factor: float = Field(1.0, description="λ in θ₀ + λ·merged")
    density: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="share of largest-magnitude entries of each task vector kept (per tensor)",
    )
    merge_func: Literal["sum", "mean", "max"] = Field(
        "mean", description="how agreeing entries are combined"
    )


class BatchTies:
    name: ClassVar[str] = "batch_ties"
    summary: ClassVar[str] = "one-shot TIES: trim, elect sign, disjoint merge"
    Params = BatchTiesParams

    def merge_tensor(
        self, params: BatchTiesParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        trimmed = [trim(t, tensor_threshold(t, params.density)) for t in taus]
        return disjoint_merge(trimmed, params.merge_func), params.scaling_factor


class DareParams(MethodParams):
    drop_rate: float = Field(
        0.9, ge=0.0, lt=1.0, description="p: share of task-vector entries dropped at random"
    )
    scaling_factor: float = Field(0.3, description="s in θ₀ + s·Σ rescaled τ_i")
    seed: int = Field(
        0, description="random seed; masks depend only on (seed, tensor name, checkpoint index)"
    )


class Dare:
    name: ClassVar[str] = "batch_dare"
    summary: ClassVar[str] = (
        "one-shot DARE: drop entries with prob p, rescale by 1/(1−p), then task arithmetic"
    )
    Params = DareParams

    def merge_tensor(
        self, params: DareParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        out = torch.zeros_like(taus[0])
        for i, t in enumerate(taus):
            g = torch.Generator().manual_seed(zlib.crc32(f"{params.seed}:{key}:{i}".encode()))
            keep = torch.rand(t.shape, generator=g) >= params.drop_rate
            out += t * keep.to(t.device) / (1.0 - params.drop_rate)
        return out, params.scaling_factor


class AverageParams(MethodParams):
    pass


class Average:
    name: ClassVar[str] = "batch_average"
    summary: ClassVar[str] = "one-shot weight averaging: mean of the checkpoints"
    Params = AverageParams

    def merge_tensor(
        self, params: AverageParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        return _sum(taus) / len(taus), 1.0
