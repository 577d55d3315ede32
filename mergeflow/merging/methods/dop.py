"""DOP: dual projections ("Continual Model Merging without Data: Dual Projections for Balancing
Stability and Plasticity", NeurIPS 2025), as FusionBench implements it
(https://github.com/tanganke/fusion_bench, ``fusion_bench/method/dop/dop_general.py``).

Step 1 keeps the first checkpoint: ``D_1 = τ_1``. For t ≥ 2, with the previous merged task
vector ``τ_a = D_{t−1}`` (stability) and the new one ``τ_b = τ_t`` (plasticity), each
projected matrix (``nn.Linear`` weight) is found by minimising, from ``X₀ = (τ_a + τ_b)/2``,

    L_i(X) = ‖S_i U_iᵀ (X − τ_i)‖²_F + ‖(X − τ_i) V_i S_i‖²_F          (proj_space "uv")

where ``τ_i = U Σ Vᵀ`` truncated to the first ``r_i`` singular triplets, ``r_i`` the first
index where ``cumsum(σ)/Σσ ≥ svd_epsilon`` (``"u"`` or ``"v"`` keeps one term). Each of the
``steps`` Adam steps (learning rate ``lr``) descends ``c_a·∇L_a + c_b·∇L_b``: the weights
``c`` are the min-norm point of the two loss-normalised gradients ``∇L_i/L_i`` (MGDA's
two-task closed form, clipped to [0.001, 0.999]), smoothed by an exponential moving average
started at ``(alpha, 1 − alpha)`` with decay ``ema_beta`` (``mgda: false``: fixed
``(alpha, 1 − alpha)``). Every other tensor is the average ``(τ_a + τ_b)/2``. Scale: 1.

The gradient is computed in closed form, ``∇L_i = 2(U_iS_i²U_iᵀΔ_i + Δ_iV_iS_i²V_iᵀ)`` with
``Δ_i = X − τ_i``, through whichever of ``U S²Uᵀ`` (formed once) or the thin factors is
cheaper, and ``L_i = ½⟨Δ_i, ∇L_i⟩``: one pass per task and step where autograd needs three.
Coordinates are task vectors (``X − θ₀``), so nothing depends on θ₀. A task vector that is
zero has an empty subspace, so its loss and gradient are 0 and it is left out of the
normalisation (FusionBench would divide by zero). Deterministic: no random numbers.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import ContinualMethod, MethodParams, NoScalars, TensorStep


class DOPParams(MethodParams):
    lr: float = Field(1e-4, gt=0.0, description="Adam learning rate")
    steps: int = Field(200, ge=0, le=100_000, description="Adam steps per projected matrix")
    mgda: bool = Field(True, description="weigh the two losses by MGDA (else fixed alpha)")
    ema: bool = Field(True, description="smooth the MGDA weights by a moving average")
    ema_beta: float = Field(0.999, ge=0.0, le=1.0, description="decay of the moving average")
    alpha: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="weight of the previous merge (stability): initial with ema, fixed without mgda",
    )
    svd_epsilon: float = Field(
        0.99999, ge=0.0, le=1.0, description="share of the singular-value mass kept per subspace"
    )
    proj_space: Literal["uv", "u", "v"] = Field(
        "uv", description="project Δ on the left (u), right (v) or both (uv) singular subspaces"
    )


def split_rank(sigma: torch.Tensor, epsilon: float) -> int:
    """First index where ``cumsum(σ)/Σσ ≥ ε`` (FusionBench's ``searchsorted``); 0 for σ = 0."""
    total = sigma.sum()
    if not bool(total > 0):
        return 0
    ratio = sigma.cumsum(0) / total
    target = torch.tensor([epsilon], dtype=ratio.dtype, device=ratio.device)
    return int(torch.searchsorted(ratio, target).item())


class _Quadratic:
    """``∇L(X) = 2(U S²Uᵀ Δ + Δ V S²Vᵀ)`` with ``Δ = X − τ``, for one task vector τ."""

    def __init__(self, tau: torch.Tensor, p: DOPParams) -> None:
        self.tau = tau
        m, n = tau.shape
        u, sigma, vh = torch.linalg.svd(tau, full_matrices=False)
        r = split_rank(sigma, p.svd_epsilon)
        self.empty = r == 0
        us, vs = u[:, :r] * sigma[:r], vh[:r].T * sigma[:r]  # U S, V S
        # Left term: U S²Uᵀ Δ via the m×m matrix (m·m·n) or two thin products (2·r·m·n).
        self.left: tuple[torch.Tensor, ...] | None = None
        self.right: tuple[torch.Tensor, ...] | None = None
        if p.proj_space in ("uv", "u"):
            self.left = (us @ us.T,) if m <= 2 * r else (us * sigma[:r], u[:, :r].T)
        if p.proj_space in ("uv", "v"):
            self.right = (vs @ vs.T,) if n <= 2 * r else (vh[:r].T, vs * sigma[:r])

    def grad(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(∇L(X), L(X))`` (few temporaries: a fold's working memory is a few matrices)."""
        delta = x - self.tau
        if self.empty:
            return delta.zero_(), 0.0
        g: torch.Tensor | None = None
        if self.left is not None:
            g = self.left[0] @ (delta if len(self.left) == 1 else self.left[1] @ delta)
        if self.right is not None:
            r = delta @ self.right[0]
            if len(self.right) == 2:
                r = r @ self.right[1].T
            g = r if g is None else g.add_(r)
            del r
        assert g is not None  # proj_space selects at least one side
        g.mul_(2)
        return g, 0.5 * float(torch.vdot(delta.flatten(), g.flatten()))


def min_norm_weight(v11: float, v12: float, v22: float) -> float:
    """γ minimising ‖γ·g₁ + (1−γ)·g₂‖² from the Gram entries (MGDA's two-task rule)."""
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -(v12 - v22) / (v11 + v22 - 2 * v12)


def dop_optimize(prev: torch.Tensor, tau: torch.Tensor, p: DOPParams) -> torch.Tensor:
    """The DOP merge of one matrix (see the module docstring), in task-vector coordinates."""
    tasks = (_Quadratic(prev, p), _Quadratic(tau, p))
    x = torch.nn.Parameter((prev + tau) / 2)
    opt = torch.optim.Adam([x], lr=p.lr, foreach=False)
    weights = [p.alpha, 1.0 - p.alpha]
    for _ in range(p.steps):
        with torch.no_grad():
            (ga, la), (gb, lb) = tasks[0].grad(x), tasks[1].grad(x)
            if p.mgda:
                # Gram entries of the loss-normalised gradients ∇L_i/L_i (a zero loss has a
                # zero gradient and stays 0), without forming them.
                ia, ib = 1 / la if la > 0 else 0.0, 1 / lb if lb > 0 else 0.0
                v11 = float(torch.vdot(ga.flatten(), ga.flatten())) * ia * ia
                v12 = float(torch.vdot(ga.flatten(), gb.flatten())) * ia * ib
                v22 = float(torch.vdot(gb.flatten(), gb.flatten())) * ib * ib
                gamma = min_norm_weight(v11, v12, v22)
                if p.ema:
                    b = p.ema_beta
                    weights = [
                        b * weights[0] + (1 - b) * gamma,
                        b * weights[1] + (1 - b) * (1 - gamma),
                    ]
                else:
                    weights = [gamma, 1.0 - gamma]
            x.grad = ga.mul_(weights[0]).add_(gb, alpha=weights[1])
            del ga, gb
        opt.step()
    return x.detach()


class DOP(ContinualMethod[DOPParams, NoScalars]):
    name: ClassVar[str] = "dop"
    summary: ClassVar[str] = (
        "dual projections: each matrix optimised to keep both the merge's and the new task's singular subspaces"
    )
    Params = DOPParams

    def fold_tensor(self, params: DOPParams, s: TensorStep) -> torch.Tensor:
        """D_1 = τ_1; then the optimised matrix for projected tensors, (D_{t−1} + τ_t)/2 for the others."""
        if s.prev is None:
            return s.tau.clone()
        if not s.projected or s.tau.ndim != 2:
            return (s.prev + s.tau) / 2
        return dop_optimize(s.prev, s.tau, params).to(s.prev.dtype)

    def elementwise(self, params: DOPParams, projected: bool) -> bool:
        return not projected
