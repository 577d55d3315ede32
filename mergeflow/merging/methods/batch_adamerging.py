"""Batch learned coefficients: layer-wise AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575).

Over a pool of checkpoints, one coefficient per checkpoint and tensor (``granularity:
tensor``) or per checkpoint and module (``module``)::

    θ̄ = θ₀ + Σ_i λ_{i,k} τ_{i,k}

learned with Adam (``steps``, ``lr``) from ``init`` (0.3, task arithmetic's default) on the
calibration objective of every task in the pool: cross-entropy where the data has labels,
entropy of the predictions where it has none. Deterministic for a seed. Unlike the continual
``adamerging``, memory grows with the pool: every task vector is held during learning (this
is the batch form, for ``merge`` and comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.errors import LearningError
from mergeflow.merging.methods.adamerging import group_of
from mergeflow.merging.methods.base import MethodParams, Objective, Pool, PoolMethod


class BatchAdaMergingParams(MethodParams):
    steps: int = Field(150, ge=1, description="Adam steps")
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate")
    init: float = Field(0.3, description="starting coefficient of every task vector")
    granularity: Literal["tensor", "module"] = Field(
        "tensor",
        description="one coefficient per checkpoint and tensor, or per checkpoint and module",
    )
    loss: Literal["auto", "cross_entropy", "entropy"] = Field(
        "auto", description="auto: cross-entropy where the data has labels, entropy otherwise"
    )
    batch_size: int = Field(32, ge=1, description="calibration examples per task and step")
    seed: int = Field(0, description="seed of the minibatch order")


class BatchAdaMerging(PoolMethod[BatchAdaMergingParams]):
    name: ClassVar[str] = "batch_adamerging"
    summary: ClassVar[str] = (
        "layer-wise AdaMerging: one coefficient per checkpoint and tensor, learned with Adam "
        "on the calibration data of every task in the pool"
    )
    Params = BatchAdaMergingParams

    def merge(
        self,
        params: BatchAdaMergingParams,
        pool: Pool,
        objective: Objective,
        log: Callable[[str], None],
    ) -> dict[str, torch.Tensor]:
        """Σ_i λ_{i,k} τ_{i,k} with the learned coefficients."""
        base = {k: pool.base(k) for k in pool.keys}
        taus = [{k: pool.tau(i, k) for k in pool.keys} for i in range(pool.size)]
        groups = sorted({group_of(k, params.granularity) for k in pool.keys})
        gi = {k: groups.index(group_of(k, params.granularity)) for k in pool.keys}
        lam = torch.full((pool.size, len(groups)), params.init, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=params.lr)
        for step in range(params.steps):
            x = {}
            for k, b in base.items():
                v = b
                for i in range(pool.size):
                    v = v + lam[i, gi[k]].to(b.dtype) * taus[i][k]
                x[k] = v
            loss = objective(x, step)
            if not math.isfinite(float(loss.detach())):
                raise LearningError(
                    f"the calibration loss became {float(loss.detach())} at step {step + 1}; lower lr (now {params.lr:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0 or (step + 1) % 25 == 0 or step + 1 == params.steps:
                log(f"step {step + 1}/{params.steps}: loss {float(loss.detach()):.4f}")
        with torch.no_grad():
            return {
                k: sum(
                    (float(lam[i, gi[k]]) * taus[i][k] for i in range(pool.size)),
                    torch.zeros_like(base[k]),
                )
                for k in pool.keys
            }
