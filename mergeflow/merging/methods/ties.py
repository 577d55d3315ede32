"""Continual TIES (after Yadav et al. 2023, https://arxiv.org/abs/2306.01708), without FusionBench's double counting.

Each incoming τ_t is trimmed to its top ``density`` share of magnitudes (per tensor by
default; ``trim=global`` uses the exact global top-k over the whole checkpoint). The
sign of each entry is elected from the running merged vector T and the trimmed τ̂_t
(γ = sign(T + τ̂_t)); entries that disagree with γ are dropped and the rest are
combined by ``merge_func`` (sum, mean or max magnitude). θ̄_t = θ₀ + s·T_t.
FusionBench's ContinualTiesMerging adds the previous merge to a TIES merge that
already contains it (T counted twice per step); here T_t replaces T_{t−1}.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import (
    ContinualMethod,
    NoScalars,
    ScaledParams,
    TauPass,
    TensorStep,
)
from mergeflow.merging.sparsify import global_threshold, tensor_threshold, trim


class TiesParams(ScaledParams):
    scale: float = Field(0.5, description="s: weight of the merged task vector")
    density: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="share of largest-magnitude entries of each task vector kept",
    )
    trim: Literal["per_tensor", "global"] = Field(
        "per_tensor",
        description="top-k per tensor (streaming) or exact over the whole checkpoint (two extra passes)",
    )
    merge_func: Literal["sum", "mean", "max"] = Field(
        "sum", description="how agreeing entries are combined"
    )


def disjoint_merge(vectors: list[torch.Tensor], merge_func: str) -> torch.Tensor:
    """Elect the sign of the sum and combine the entries that agree with it."""
    stacked = torch.stack(vectors)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    kept = stacked * agree
    if merge_func == "sum":
        return kept.sum(0)
    if merge_func == "mean":
        return kept.sum(0) / agree.sum(0).clamp(min=1)
    idx = kept.abs().argmax(0, keepdim=True)
    return kept.gather(0, idx).squeeze(0)


class Ties(ContinualMethod[TiesParams, NoScalars]):
    name: ClassVar[str] = "ties"
    summary: ClassVar[str] = (
        "continual TIES: trim, elect sign with the running merge, disjoint merge"
    )
    Params = TiesParams

    def prepare(self, params: TiesParams, taus: TauPass) -> dict[str, float] | None:
        """With ``trim=global``: the exact global top-k magnitude threshold (two passes)."""
        if params.trim == "global":
            return {"threshold": global_threshold(taus, params.density)}
        return None

    def fold_tensor(self, params: TiesParams, s: TensorStep) -> torch.Tensor:
        """Trim τ_t, then disjoint-merge it with D_{t−1}."""
        thr = (
            s.prepared["threshold"]
            if "threshold" in s.prepared
            else tensor_threshold(s.tau, params.density)
        )
        trimmed = trim(s.tau, thr)
        if s.prev is None:
            return trimmed
        return disjoint_merge([s.prev, trimmed], params.merge_func)
