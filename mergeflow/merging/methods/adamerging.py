"""Learned continual coefficients: AdaMerging's idea made continual and constant in memory.

AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575) learns one merging
coefficient per task and layer by minimising a loss of the merged model on data. Here each
fold learns, per output row of every matrix (``granularity: row``, the default), per
tensor (``tensor``) or per module (``module``), the pair ``(a, b)`` of

    M_t = a·M_{t−1} + b·τ_t,        θ̄_t = θ₀ + M_t

With ``row``, a tensor of two or more dimensions gets one pair per index of its first
dimension (an ``nn.Linear`` weight ``[out, in]``: one per output feature; an embedding:
one per token), ``M_t[r] = a_r·M_{t−1}[r] + b_r·τ_t[r]``, and a vector (bias, norm weight)
or scalar keeps one pair for the whole tensor, so no entry of the model is learned freely.

where ``M_{t−1}`` is the previous merged task vector (with ``update: projected``, ``τ_t`` of
each projected matrix is first replaced by its OPCM projection X̃_t against ``M_{t−1}``, so
the coefficients scale an update that leaves the merge's top singular directions alone). The pairs start at the running mean's
``((t−1)/t, 1/t)`` and take ``steps`` Adam steps (learning rate ``lr``) on the
calibration objective of every task folded so far, the new one included: cross-entropy
where the calibration data has labels, AdaMerging's entropy of the predictions where it
has none (``loss: auto``, the default; see :class:`~mergeflow.merging.methods.base.Objective`).
Deterministic for a ``seed``: the objective draws its minibatches from it and Adam has no
randomness.

The state is ``M`` alone (scale 1); the coefficients live only during the fold, and the
calibration data is read in minibatches, so memory does not grow with the number of
checkpoints: the step holds θ₀, ``M_{t−1}`` and ``τ_t`` (three copies of the model) plus one
minibatch's activations. A non-finite loss or coefficient stops the fold
(:class:`~mergeflow.errors.LearningError`): nothing is folded.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.errors import LearningError
from mergeflow.merging.linalg import project
from mergeflow.merging.methods.base import (
    ContinualMethod,
    MethodParams,
    NoScalars,
    Prepared,
    TensorStep,
    WholeModel,
)


class AdaMergingParams(MethodParams):
    steps: int = Field(80, ge=1, description="Adam steps per fold")
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the coefficients")
    granularity: Literal["row", "tensor", "module"] = Field(
        "row",
        description="one (a, b) pair per output row of each matrix (vectors: per tensor), "
        "per tensor, or per module (the name up to its last '.')",
    )
    loss: Literal["auto", "cross_entropy", "entropy"] = Field(
        "auto",
        description="auto: cross-entropy where the calibration data has labels, entropy where it has none",
    )
    batch_size: int = Field(32, ge=1, description="calibration examples per task and step")
    seed: int = Field(0, description="seed of the minibatch order")
    update: Literal["task_vector", "projected"] = Field(
        "task_vector",
        description="what b scales: τ_t, or for projected tensors its OPCM projection X̃_t against M_{t−1}",
    )
    alpha: float = Field(
        0.5, ge=0.0, lt=1.0, description="with update=projected: OPCM's protected share of M_{t−1}"
    )


def group_of(key: str, granularity: str) -> str:
    """The coefficient group of a tensor: itself, or its module (the name up to its last '.')."""
    return (key.rpartition(".")[0] or key) if granularity == "module" else key


def coefficient_rows(tensor: torch.Tensor, granularity: str) -> int | None:
    """How many rows of coefficients a tensor's group has: dim 0 of a matrix under ``row``, else None (one)."""
    return tensor.shape[0] if granularity == "row" and tensor.ndim >= 2 else None


def scaled(x: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """``c·x``, a vector ``c`` scaling ``x`` row by row (its first dimension)."""
    if isinstance(c, torch.Tensor):
        return x * c.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * c


Coefficient = float | torch.Tensor
"""One group's a or b: a float, or a vector with one entry per row (``granularity: row``)."""


def learn_coefficients(
    params: AdaMergingParams, whole: WholeModel
) -> tuple[dict[str, tuple[Coefficient, Coefficient]], list[float]]:
    """Adam on ``(a, b)`` per group; returns ``group -> (a, b)`` and the loss at every step."""
    objective = whole.objective
    if objective is None:
        raise LearningError("adamerging needs calibration data, and none was given")
    base = dict(whole.base())
    taus = dict(whole.taus())
    merged = dict(whole.merged()) if whole.merged is not None else {}
    if params.update == "projected":
        for k in whole.projected & merged.keys():
            taus[k] = _update(params, taus[k], merged[k])
    gk = {k: group_of(k, params.granularity) for k in base}
    rows = {gk[k]: coefficient_rows(v, params.granularity) for k, v in base.items()}
    t = whole.step

    def start(value: float, n: int | None) -> torch.Tensor:
        return torch.full((n,) if n else (), value, dtype=torch.float32, requires_grad=True)

    a = {g: start((t - 1) / t, n) for g, n in rows.items()}
    b = {g: start(1.0 / t, n) for g, n in rows.items()}
    opt = torch.optim.Adam([*a.values(), *b.values()], lr=params.lr)
    losses: list[float] = []
    for i in range(params.steps):
        tensors = {}
        for k, b0 in base.items():
            x = b0 + scaled(taus[k], b[gk[k]])
            if k in merged:
                x = x + scaled(merged[k], a[gk[k]])
            tensors[k] = x
        loss = objective(tensors, i)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LearningError(
                f"the calibration loss became {value} at step {i + 1} of {params.steps}; "
                f"lower lr (now {params.lr:g})"
            )
        losses.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not all(bool(torch.isfinite(c).all()) for c in (*a.values(), *b.values())):
            raise LearningError(
                f"the coefficients became non-finite at step {i + 1}; lower lr (now {params.lr:g})"
            )
    return {g: (learned(a[g]), learned(b[g])) for g in rows}, losses


def learned(c: torch.Tensor) -> Coefficient:
    """A learned coefficient as a float, or a detached copy of its row coefficients."""
    return float(c.detach()) if c.ndim == 0 else c.detach().clone()


def _update(params: AdaMergingParams, tau: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """X̃ = τ projected off M_{t−1}'s protected subspace (OPCM's projection, :mod:`..linalg`)."""
    return project(tau, prev, params.alpha, "auto").to(tau.dtype)


class AdaMerging(ContinualMethod[AdaMergingParams, NoScalars]):
    name: ClassVar[str] = "adamerging"
    summary: ClassVar[str] = (
        "learned continual coefficients: M_t = a·M_{t−1} + b·τ_t, (a, b) per output row "
        "(or tensor) learned with Adam on the calibration data of every task folded so far"
    )
    Params = AdaMergingParams
    needs_objective: ClassVar[bool] = True

    def prepare(self, params: AdaMergingParams, whole: WholeModel) -> Prepared | None:
        """The learned pairs as ``a:<group>``/``b:<group>``, plus the first and last loss."""
        coef, losses = learn_coefficients(params, whole)
        out: Prepared = {f"a:{g}": ab[0] for g, ab in coef.items()}
        out |= {f"b:{g}": ab[1] for g, ab in coef.items()}
        return out | {"loss:first": losses[0], "loss:last": losses[-1]}

    def fold_tensor(self, params: AdaMergingParams, s: TensorStep) -> torch.Tensor:
        """``D_t = a·D_{t−1} + b·τ_t`` with the learned pair of the tensor's group."""
        g = group_of(s.key, params.granularity)
        b = s.prepared[f"b:{g}"]
        if s.prev is None:
            return scaled(s.tau, b)
        x = _update(params, s.tau, s.prev) if self._projects(params, s.projected) else s.tau
        return scaled(s.prev, s.prepared[f"a:{g}"]) + scaled(x, b)

    @staticmethod
    def _projects(params: AdaMergingParams, projected: bool) -> bool:
        return params.update == "projected" and projected

    def elementwise(self, params: AdaMergingParams, projected: bool) -> bool:
        return params.granularity != "row" and not self._projects(params, projected)
