"""FW-Merging, FW-Hard (Chen et al. 2025, "Scaling Model Merging with Frank-Wolfe Optimization",
https://arxiv.org/abs/2503.12649), as its authors and FusionBench run it.

Over a pool of checkpoints θ_1..θ_n with task vectors τ_i, starting at task arithmetic of
the pool, ``θ̄⁰ = θ₀ + λ·Σ_i τ_i`` (λ = ``scaling_factor``), each iteration t = 0..T−1:

1. the gradient ``g = ∇L(θ̄ᵗ)`` of the calibration loss (about ``examples`` labelled
   examples per task, cross-entropy);
2. the task-wise linear minimisation oracle: over the pool's checkpoints and the initial
   merge θ̄⁰, the one with the lowest summed per-tensor cosine ``Σ_k cos(g_k, θ_{m,k})``
   (cosines with the checkpoint's weights, as the authors compute them);
3. the step ``γ_t = 2/(t+2)·step_size`` and the local merge
   ``θ̄ᵗ⁺¹ = θ̄ᵗ + γ_t·λ·(θ_m − θ̄ᵗ)``.

``init: base`` starts at θ₀ instead (FusionBench's ``init_weight: base``); the oracle's
extra candidate is then the base. Memory does not grow with the pool: the initialisation and the oracle stream each
checkpoint tensor by tensor (:class:`~mergeflow.merging.methods.base.Pool`), so the step
holds θ₀, θ̄, θ̄⁰ and the gradient (four copies of the model) whatever the pool's size; the
chosen checkpoint is read again for the update. Defaults are the authors' (FusionBench's
``fw_hard.yaml``): 10 iterations, step size 0.1, λ 0.3, 100 examples per task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.errors import LearningError
from mergeflow.merging.methods.base import (
    MethodParams,
    Objective,
    ObjectiveOptions,
    Pool,
    PoolMethod,
)


class FWMergingParams(MethodParams):
    max_iters: int = Field(10, ge=1, description="Frank-Wolfe iterations T")
    step_size: float = Field(0.1, gt=0.0, description="γ_t = 2/(t+2)·step_size")
    scaling_factor: float = Field(
        0.3, gt=0.0, description="λ: task arithmetic's scale at the start and in every local merge"
    )
    examples: int = Field(100, ge=1, description="calibration examples per task for each gradient")
    init: Literal["task_arithmetic", "base"] = Field(
        "task_arithmetic",
        description="start at task arithmetic of the pool (FusionBench's default) or at the base (init_weight: base)",
    )


def cos_sums(
    grads: Sequence[Mapping[str, torch.Tensor]], weights: Callable[[str], torch.Tensor]
) -> list[float]:
    """``Σ_k cos(g_k, w_k)`` for each gradient ``g`` of ``grads`` (0 for a zero tensor),
    streaming ``weights`` once: each of its tensors is read one time for all the gradients."""
    totals = [0.0] * len(grads)
    if not grads:
        return totals
    for k in grads[0]:
        w = weights(k)
        w_norm = float(torch.linalg.vector_norm(w))
        for j, g in enumerate(grads):
            gk = g[k]
            den = float(torch.linalg.vector_norm(gk)) * w_norm
            if den > 0:
                totals[j] += float(torch.dot(gk.reshape(-1), w.reshape(-1).to(gk.dtype))) / den
    return totals


def weights_of(
    pool: Pool, base: Mapping[str, torch.Tensor], i: int
) -> Callable[[str], torch.Tensor]:
    """θ_i tensor by tensor, read from the pool on demand."""

    def get(k: str) -> torch.Tensor:
        return base[k] + pool.tau(i, k)

    return get


def calibration_gradient(
    objective: Objective,
    base: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    step: int,
    where: str,
) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of ``θ₀ + δ`` on the objective's minibatch ``step`` and its gradient per tensor
    (zeros where the loss does not reach). A non-finite loss or gradient raises
    :class:`~mergeflow.errors.LearningError` naming ``where``."""
    keys = tuple(base)
    x = {k: (base[k] + delta[k]).requires_grad_(True) for k in keys}
    loss = objective(x, step)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise LearningError(f"the calibration loss became {value} at {where}")
    grads = torch.autograd.grad(loss, [x[k] for k in keys], allow_unused=True)
    g = {
        k: (gk if gk is not None else torch.zeros_like(base[k])).detach()
        for k, gk in zip(keys, grads, strict=True)
    }
    for k, gk in g.items():
        if not bool(torch.isfinite(gk).all()):
            raise LearningError(f"the calibration gradient of {k!r} became non-finite at {where}")
    return value, g


class FWMerging(PoolMethod[FWMergingParams]):
    name: ClassVar[str] = "fw_merging"
    summary: ClassVar[str] = (
        "FW-Merging (FW-Hard): Frank-Wolfe over a pool of checkpoints with a linear oracle on "
        "the calibration gradient (the paper claims robustness to irrelevant checkpoints: see benchmarks/fw_pool.py)"
    )
    Params = FWMergingParams

    def objective_options(self, params: FWMergingParams) -> ObjectiveOptions:
        """``examples`` labelled examples per task for each gradient, cross-entropy (the authors')."""
        return ObjectiveOptions(batch_size=params.examples, seed=0, loss="cross_entropy")

    def merge(
        self, params: FWMergingParams, pool: Pool, objective: Objective, log: Callable[[str], None]
    ) -> dict[str, torch.Tensor]:
        """θ̄ − θ₀ after ``max_iters`` Frank-Wolfe steps (see the module docstring)."""
        lam = params.scaling_factor
        base = {k: pool.base(k) for k in pool.keys}
        init: dict[str, torch.Tensor] = {k: torch.zeros_like(b) for k, b in base.items()}
        if params.init == "task_arithmetic":
            for i in range(pool.size):
                for k in pool.keys:
                    init[k].add_(pool.tau(i, k), alpha=lam)
        delta = {k: v.clone() for k, v in init.items()}  # θ̄ − θ₀
        names = pool.names or tuple(str(i) for i in range(pool.size))
        for t in range(params.max_iters):
            loss, g = calibration_gradient(objective, base, delta, t, f"iteration {t + 1}")
            # the oracle: the checkpoint (or the initial merge) least aligned with the gradient
            best, best_cos = -1, cos_sums([g], lambda k: base[k] + init[k])[0]
            for i in range(pool.size):
                c = cos_sums([g], weights_of(pool, base, i))[0]
                if c < best_cos:
                    best, best_cos = i, c
            gamma = 2.0 / (t + 2) * params.step_size
            for k in pool.keys:
                target = init[k] if best < 0 else pool.tau(best, k)  # θ_m − θ₀
                delta[k].add_(target - delta[k], alpha=gamma * lam)
            chosen = "the initial merge" if best < 0 else names[best]
            log(
                f"iteration {t + 1}/{params.max_iters}: loss {loss:.4f}, "
                f"chose {chosen} (cosine sum {best_cos:.4f}), step {gamma * lam:.4f}"
            )
        return delta
