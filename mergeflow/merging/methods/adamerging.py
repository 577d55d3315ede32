"""Learned continual coefficients: AdaMerging's idea made continual and constant in memory.

AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575) learns one merging
coefficient per task and layer by minimising a loss of the merged model on data. Here each
fold learns, per tensor (``granularity: tensor``) or per module (``module``), the pair
``(a, b)`` of

    M_t = a·M_{t−1} + b·τ_t,        θ̄_t = θ₀ + M_t

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
    TensorStep,
    WholeModel,
)


class AdaMergingParams(MethodParams):
    steps: int = Field(80, ge=1, description="Adam steps per fold")
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the coefficients")
    granularity: Literal["tensor", "module"] = Field(
        "tensor",
        description="one (a, b) pair per tensor, or per module (the name up to its last '.')",
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
    return key if granularity == "tensor" else key.rpartition(".")[0] or key


def learn_coefficients(
    params: AdaMergingParams, whole: WholeModel
) -> tuple[dict[str, tuple[float, float]], list[float]]:
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
    groups = sorted({group_of(k, params.granularity) for k in base})
    index = {g: i for i, g in enumerate(groups)}
    gi = {k: index[group_of(k, params.granularity)] for k in base}
    t = whole.step
    a = torch.full((len(groups),), (t - 1) / t, dtype=torch.float32, requires_grad=True)
    b = torch.full((len(groups),), 1.0 / t, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=params.lr)
    losses: list[float] = []
    for i in range(params.steps):
        tensors = {}
        for k, b0 in base.items():
            x = b0 + b[gi[k]].to(b0.dtype) * taus[k]
            if k in merged:
                x = x + a[gi[k]].to(b0.dtype) * merged[k]
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
        if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LearningError(
                f"the coefficients became non-finite at step {i + 1}; lower lr (now {params.lr:g})"
            )
    out = {g: (float(a.detach()[index[g]]), float(b.detach()[index[g]])) for g in groups}
    return out, losses


def _update(params: AdaMergingParams, tau: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """X̃ = τ projected off M_{t−1}'s protected subspace (OPCM's projection, :mod:`..linalg`)."""
    return project(tau, prev, params.alpha, "auto").to(tau.dtype)


class AdaMerging(ContinualMethod[AdaMergingParams, NoScalars]):
    name: ClassVar[str] = "adamerging"
    summary: ClassVar[str] = (
        "learned continual coefficients: M_t = a·M_{t−1} + b·τ_t, (a, b) per tensor learned "
        "with Adam on the calibration data of every task folded so far"
    )
    Params = AdaMergingParams
    needs_objective: ClassVar[bool] = True

    def prepare(self, params: AdaMergingParams, whole: WholeModel) -> dict[str, float] | None:
        """The learned pairs as ``a:<group>``/``b:<group>``, plus the first and last loss."""
        coef, losses = learn_coefficients(params, whole)
        out = {f"a:{g}": ab[0] for g, ab in coef.items()}
        out |= {f"b:{g}": ab[1] for g, ab in coef.items()}
        return out | {"loss:first": losses[0], "loss:last": losses[-1]}

    def fold_tensor(self, params: AdaMergingParams, s: TensorStep) -> torch.Tensor:
        """``D_t = a·D_{t−1} + b·τ_t`` with the learned pair of the tensor's group."""
        g = group_of(s.key, params.granularity)
        b = s.prepared[f"b:{g}"]
        if s.prev is None:
            return s.tau * b
        x = _update(params, s.tau, s.prev) if self._projects(params, s.projected) else s.tau
        return s.prev * s.prepared[f"a:{g}"] + x * b

    @staticmethod
    def _projects(params: AdaMergingParams, projected: bool) -> bool:
        return params.update == "projected" and projected

    def elementwise(self, params: AdaMergingParams, projected: bool) -> bool:
        return not self._projects(params, projected)
