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

from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import (
    ContinualMethod,
    NoScalars,
    Prepared,
    ScaledParams,
    TensorStep,
    WholeModel,
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


def disjoint_merge(
    vectors: Sequence[torch.Tensor],
    merge_func: str,
    transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Elect the sign of the sum and combine the entries that agree with it.

    Streams over ``vectors`` twice (sign election, then the merge) and never stacks them,
    so memory is a few tensors whatever their number. ``transform(i, v)`` (e.g. trimming)
    is applied to each vector as it is read, in both passes.
    """

    def each() -> Iterator[torch.Tensor]:
        for i, v in enumerate(vectors):
            yield v if transform is None else transform(i, v)

    total: torch.Tensor | None = None
    for v in each():
        total = v.clone() if total is None else total.add_(v)
    assert total is not None
    sign = torch.sign(total)
    del total
    out = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if merge_func == "mean" else None
    for v in each():
        agree = (torch.sign(v) == sign) & (v != 0)
        kept = torch.where(agree, v, torch.zeros((), dtype=v.dtype, device=v.device))
        if merge_func == "max":
            out = torch.where(kept.abs() > out.abs(), kept, out)
        else:
            out += kept
            if count is not None:
                count += agree
    if count is not None:
        out /= count.clamp(min=1)
    return out


class Ties(ContinualMethod[TiesParams, NoScalars]):
    name: ClassVar[str] = "ties"
    summary: ClassVar[str] = (
        "continual TIES: trim, elect sign with the running merge, disjoint merge"
    )
    Params = TiesParams

    def prepare(self, params: TiesParams, whole: WholeModel) -> Prepared | None:
        """With ``trim=global``: the exact global top-k magnitude threshold (two passes)."""
        if params.trim == "global":
            return {"threshold": global_threshold(whole.taus, params.density)}
        return None

    def fold_tensor(self, params: TiesParams, s: TensorStep) -> torch.Tensor:
        """Trim τ_t, then disjoint-merge it with D_{t−1}."""
        thr = (
            float(s.prepared["threshold"])
            if "threshold" in s.prepared
            else tensor_threshold(s.tau, params.density)
        )
        trimmed = trim(s.tau, thr)
        if s.prev is None:
            return trimmed
        return disjoint_merge([s.prev, trimmed], params.merge_func)
