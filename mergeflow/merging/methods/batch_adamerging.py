"""Batch learned coefficients: layer-wise AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575).

Over a pool of checkpoints, one coefficient per checkpoint and tensor (``granularity:
tensor``), per checkpoint and module (``module``) or per checkpoint and output row of each
matrix (``row``, as the continual ``adamerging``; vectors keep one per tensor)::

    θ̄ = θ₀ + Σ_i λ_{i,k} τ_{i,k}

learned with Adam (``steps``, ``lr``) from ``init`` (0.3, task arithmetic's default) on the
calibration objective of every task in the pool: cross-entropy where the data has labels,
entropy of the predictions where it has none (the coefficients are in the compute dtype;
:func:`learn_layer_coefficients` is also FW-Soft's step). Deterministic for a seed. Unlike the continual
``adamerging``, memory grows with the pool: every task vector is held during learning (this
is the batch form, for ``merge`` and comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.errors import LearningError
from mergeflow.merging.methods.adamerging import coefficient_rows, group_of, learned, scaled
from mergeflow.merging.methods.base import MethodParams, Objective, Pool, PoolMethod


class BatchAdaMergingParams(MethodParams):
    steps: int = Field(150, ge=1, description="Adam steps")
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate")
    init: float = Field(0.3, description="starting coefficient of every task vector")
    granularity: Literal["row", "tensor", "module"] = Field(
        "row",
        description="one coefficient per checkpoint and output row of each matrix (vectors: "
        "per tensor), per checkpoint and tensor, or per checkpoint and module",
    )
    loss: Literal["auto", "cross_entropy", "entropy"] = Field(
        "auto", description="auto: cross-entropy where the data has labels, entropy otherwise"
    )
    batch_size: int = Field(32, ge=1, description="calibration examples per task and step")
    seed: int = Field(0, description="seed of the minibatch order")


def learn_layer_coefficients(
    start: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    objective: Objective,
    *,
    init: float,
    steps: int,
    lr: float,
    granularity: str = "tensor",
    first_step: int = 0,
    what: str = "step",
    lr_name: str = "lr",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Layer-wise AdaMerging from ``start``: ``Σ_i λ_{i,g(k)} v_{i,k}`` of every tensor ``k``.

    One coefficient per vector ``v_i`` and group ``g(k)`` (:func:`group_of`; with
    ``granularity="row"``, one per row of each matrix: :func:`coefficient_rows`), all from
    ``init``, in ``start``'s dtype; ``steps`` Adam steps (learning rate ``lr``) on
    ``objective(start + Σ_i λ_i v_i, first_step + s)``. Returns the combination (detached)
    and the loss at every step. A non-finite loss or coefficient raises
    :class:`~mergeflow.errors.LearningError` (``what`` and ``lr_name`` word its message);
    ``log`` reports the first step, every 25th and the last.
    """
    keys = tuple(start)
    gk = {k: group_of(k, granularity) for k in keys}
    rows = {gk[k]: coefficient_rows(v, granularity) for k, v in start.items()}
    dtype = start[keys[0]].dtype if keys else torch.float32
    lam = {
        g: torch.full((len(vectors), *((n,) if n else ())), init, dtype=dtype, requires_grad=True)
        for g, n in rows.items()
    }
    opt = torch.optim.Adam(list(lam.values()), lr=lr)
    losses: list[float] = []
    for step in range(steps):
        x = {}
        for k, b in start.items():
            v = b
            for i, vec in enumerate(vectors):
                v = v + scaled(vec[k], lam[gk[k]][i])
            x[k] = v
        loss = objective(x, first_step + step)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LearningError(
                f"the calibration loss became {value} at {what} {step + 1}; lower {lr_name} (now {lr:g})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not all(bool(torch.isfinite(c.detach()).all()) for c in lam.values()):
            raise LearningError(
                f"the merging coefficients became non-finite at {what} {step + 1}; lower {lr_name} (now {lr:g})"
            )
        losses.append(value)
        if log is not None and (step == 0 or (step + 1) % 25 == 0 or step + 1 == steps):
            log(f"{what} {step + 1}/{steps}: loss {value:.4f}")
    with torch.no_grad():
        combined = {
            k: sum(
                (scaled(vec[k], learned(lam[gk[k]][i])) for i, vec in enumerate(vectors)),
                torch.zeros_like(start[k]),
            )
            for k in keys
        }
    return combined, losses


class BatchAdaMerging(PoolMethod[BatchAdaMergingParams]):
    name: ClassVar[str] = "batch_adamerging"
    summary: ClassVar[str] = (
        "AdaMerging: one coefficient per checkpoint and output row (or tensor), learned with Adam "
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
        merged, _ = learn_layer_coefficients(
            base,
            taus,
            objective,
            init=params.init,
            steps=params.steps,
            lr=params.lr,
            granularity=params.granularity,
            log=log,
        )
        return merged
