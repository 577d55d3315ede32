"""OPCM: orthogonal-projection continual merging (Tang et al. 2025, https://arxiv.org/abs/2501.09522).

For a new checkpoint t ≥ 2 and each projected matrix, with the previous merged task
vector ``M = W̄_{t−1} − W₀`` (thin SVD ``M = U Σ Vᵀ``, k = min(m, n)) and ``X = τ_t``:

    r  = argmax_i [ cumsum(σ)_i / Σσ > α ]                    (0-based split rank)
    X̃  = X − U_r (U_rᵀ X V_r) V_rᵀ − Σ_{i=r}^{k−1} (u_iᵀ X v_i) u_i v_iᵀ

which equals ``U P Vᵀ`` with ``P = Uᵀ X V``, its diagonal and its block ``P[:r,:r]``
zeroed (the full-SVD form of the paper). The update is ``S_t = λ_{t−1}·M + X̃``
(``+ τ_t`` unprojected for every other tensor), then a global rescale
``θ̄_t = θ₀ + S_t·μ_t/‖S_t‖`` with ``μ_t`` the mean of ``‖τ_i‖``, ``λ_t = ‖S_t‖/μ_t``.

Since ``λ_{t−1}·M = S_{t−1}``, the state keeps the unscaled ``S`` and the rescale is
the state's scale ``μ_t/‖S_t‖`` (= 1/λ_t): one pass per fold. The projection itself is
computed by :func:`mergeflow.merging.linalg.project` (float64 Gram + eigh by default, exact to
float64 rounding; rank-deficient directions carry no diagonal term). Edge cases: ``M = 0``
(frozen layer) skips the projection; all-zero task vectors give scale 1;
``α`` must lie in [0, 1) (at α ≥ 1 nothing would be protected).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from mergeflow.merging.linalg import Decomposition, project
from mergeflow.merging.methods.base import (
    ContinualMethod,
    FoldStats,
    MethodParams,
    MethodScalars,
    TensorStep,
)


class OPCMParams(MethodParams):
    alpha: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="share of the singular-value mass of M protected from interference, in [0, 1)",
    )
    decomposition: Decomposition = Field(
        "auto",
        description="auto: float64 Gram + eigh (float64 SVD where ill-conditioned); svd64: float64 SVD; svd32: float32 SVD (the research code's precision)",
    )


class OPCMScalars(MethodScalars):
    """Norms carried from fold to fold (float64 sums over all merged tensors)."""

    tv_norm_sum: float = 0.0  # Σ_i ‖τ_i‖ over the folded checkpoints
    mean_tv_norm: float = 0.0  # μ_t = tv_norm_sum / t
    last_tv_norm: float = 0.0  # ‖τ_t‖ of the last folded checkpoint
    unscaled_norm: float = 0.0  # ‖S_t‖; λ_t = unscaled_norm / mean_tv_norm


class OPCM(ContinualMethod[OPCMParams, OPCMScalars]):
    name: ClassVar[str] = "opcm"
    summary: ClassVar[str] = "orthogonal-projection continual merging with global norm rescale"
    Params = OPCMParams
    Scalars = OPCMScalars

    def fold_tensor(self, params: OPCMParams, s: TensorStep) -> torch.Tensor:
        """S_t = S_{t−1} + X̃ for projected tensors, S_{t−1} + τ_t for the others."""
        if s.prev is None:
            return s.tau.clone()
        if not s.projected:
            return s.prev + s.tau
        return s.prev + project(s.tau, s.prev, params.alpha, params.decomposition).to(s.prev.dtype)

    def elementwise(self, params: OPCMParams, projected: bool) -> bool:
        return not projected

    def finish(
        self, params: OPCMParams, scalars: OPCMScalars, stats: FoldStats
    ) -> tuple[OPCMScalars, float]:
        """Scale ``μ_t/‖S_t‖`` (1 when either norm is 0) and the updated norms."""
        last_tv_norm = math.sqrt(stats.tau_sq_norm)
        tv_norm_sum = scalars.tv_norm_sum + last_tv_norm
        mean_tv_norm = tv_norm_sum / stats.step
        unscaled_norm = math.sqrt(stats.state_sq_norm)
        scale = mean_tv_norm / unscaled_norm if unscaled_norm > 0 and mean_tv_norm > 0 else 1.0
        return (
            OPCMScalars(
                tv_norm_sum=tv_norm_sum,
                mean_tv_norm=mean_tv_norm,
                last_tv_norm=last_tv_norm,
                unscaled_norm=unscaled_norm,
            ),
            scale,
        )
