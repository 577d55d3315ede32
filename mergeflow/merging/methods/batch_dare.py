"""One-shot DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop entries with probability p,
rescale by 1/(1−p), then task arithmetic."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import BatchMethod, MethodParams


class BatchDareParams(MethodParams):
    drop_rate: float = Field(
        0.9, ge=0.0, lt=1.0, description="p: share of task-vector entries dropped at random"
    )
    scale: float = Field(0.3, description="s in θ₀ + s·Σ rescaled τ_i")
    seed: int = Field(
        0, description="random seed; masks depend only on (seed, tensor name, checkpoint index)"
    )


class BatchDare(BatchMethod[BatchDareParams]):
    name: ClassVar[str] = "batch_dare"
    summary: ClassVar[str] = (
        "one-shot DARE: drop entries with prob p, rescale by 1/(1−p), then task arithmetic"
    )
    Params = BatchDareParams

    def merge_tensor(
        self, params: BatchDareParams, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        out = torch.zeros_like(taus[0])
        for i, t in enumerate(taus):
            g = torch.Generator().manual_seed(zlib.crc32(f"{params.seed}:{key}:{i}".encode()))
            keep = torch.rand(t.shape, generator=g) >= params.drop_rate
            out += t * keep.to(t.device) / (1.0 - params.drop_rate)
        return out, params.scale
