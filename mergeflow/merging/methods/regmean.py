"""Continual RegMean: regression-mean merging of linear layers from their input Gram matrices.

RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849) merges an ``nn.Linear`` weight
``W`` (``[d_out, d_in]``) as the least-squares fit of every checkpoint's outputs on its own
inputs. With each checkpoint's Gram ``G_i`` (mean over tokens of ``x xᵀ``, from its
``mergeflow_stats.safetensors``) and ``alpha`` the share of off-diagonal entries kept
(FusionBench's ``reduce_non_diagonal_ratio``)::

    G̃_i = alpha·G_i + (1 − alpha)·diag(G_i)
    W   = (Σ G̃_i)⁻¹ (Σ G̃_i W_iᵀ)   transposed
        = W₀ + ((Σ G̃_i)⁻¹ Σ G̃_i τ_iᵀ)ᵀ

The state keeps, per tensor with a Gram, ``A = Σ G̃_i`` and ``B = Σ G̃_i τ_iᵀ`` (slots ``A``
and ``B``) beside ``D = (A⁻¹B)ᵀ``, so folding one checkpoint at a time gives the batch
formula exactly, in any order, in memory that does not grow with the number of folds.
Every other merged tensor is the running mean of the task vectors (scale 1).

The solve runs in float64. **Singular or ill-conditioned A**: Cholesky when A is positive
definite and its 1-norm condition estimate (Hager's estimator, as LAPACK's ``pocon``) is at
most 1e12;
otherwise the minimum-norm least-squares solution ``A⁺B`` from ``eigh``, with eigenvalues
below ``1e-12·λ_max`` dropped. An input direction no calibration token ever reached then
keeps the base weight (its update is 0), instead of an arbitrary one.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.methods.base import (
    ContinualMethod,
    Folded,
    MethodParams,
    NoScalars,
    TensorStep,
)
from mergeflow.merging.methods.weight_average import running_mean
from mergeflow.merging.stats import StatKind

MAX_CONDITION = 1e12
"""Above this condition estimate (or when Cholesky fails) the solve takes the pseudo-inverse."""


class RegMeanParams(MethodParams):
    alpha: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="share of the off-diagonal Gram entries kept: G̃ = alpha·G + (1 − alpha)·diag(G)",
    )


def reduce_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha·G + (1 − alpha)·diag(G)``: scales the off-diagonal entries only."""
    out = g * alpha
    out.diagonal().copy_(g.diagonal())
    return out


def condition_estimate(a: torch.Tensor, chol: torch.Tensor, iterations: int = 5) -> float:
    """``κ₁(A) = ‖A‖₁·‖A⁻¹‖₁`` with ``‖A⁻¹‖₁`` from Hager's estimator (the method of LAPACK's
    ``pocon``), a few solves with the Cholesky factor: O(n²) each, no decomposition."""
    n = a.shape[0]
    x = torch.full((n, 1), 1.0 / n, dtype=a.dtype, device=a.device)
    est = 0.0
    for _ in range(iterations):
        y = torch.cholesky_solve(x, chol)  # A⁻¹x
        est = max(est, float(y.abs().sum()))
        xi = torch.where(y >= 0, 1.0, -1.0).to(a.dtype)
        z = torch.cholesky_solve(xi, chol)  # A is symmetric: A⁻ᵀξ = A⁻¹ξ
        j = int(z.abs().argmax())
        if float(z.abs().max()) <= float((z * x).sum()):
            break
        x = torch.zeros_like(x)
        x[j] = 1.0
    if not math.isfinite(est):
        return math.inf
    return float(a.abs().sum(0).max()) * est


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A⁻¹B`` in float64 for a symmetric positive semi-definite ``A`` (rule: module docstring)."""
    a64, b64 = a.double(), b.double()
    chol, info = torch.linalg.cholesky_ex(a64)
    if int(info) == 0 and condition_estimate(a64, chol) <= MAX_CONDITION:
        return torch.cholesky_solve(b64, chol)
    lam, q = torch.linalg.eigh(a64)
    keep = lam > 1e-12 * float(lam.max().clamp(min=0))
    qk = q[:, keep]
    return qk @ ((qk.T @ b64) / lam[keep].unsqueeze(1))


class RegMean(ContinualMethod[RegMeanParams, NoScalars]):
    name: ClassVar[str] = "regmean"
    summary: ClassVar[str] = (
        "continual RegMean: least-squares merge of linear layers from their input Grams "
        "(needs mergeflow_stats.safetensors); running mean elsewhere"
    )
    Params = RegMeanParams
    statistics: ClassVar[frozenset[StatKind]] = frozenset({"gram"})
    slots: ClassVar[tuple[str, ...]] = ("A", "B")

    def fold_tensor(self, params: RegMeanParams, s: TensorStep) -> torch.Tensor | Folded:
        """``A += G̃``, ``B += G̃τᵀ``, ``D = (A⁻¹B)ᵀ`` with a Gram; the running mean without."""
        if "gram" not in s.stats:
            return running_mean(s)
        g = reduce_gram(s.stats["gram"].to(s.tau.dtype), params.alpha)
        gt = g @ s.tau.T
        a = g if "A" not in s.extra else s.extra["A"] + g
        b = gt if "B" not in s.extra else s.extra["B"] + gt
        d = solve_psd(a, b).T.to(s.tau.dtype)
        return Folded(d.contiguous(), {"A": a, "B": b})
