"""FW-Merging, FW-Soft (Chen et al. 2025, "Scaling Model Merging with Frank-Wolfe Optimization",
https://arxiv.org/abs/2503.12649), as its authors' FusionBench code runs it
(``FrankWolfeSoftAlgorithm``, ``fw_soft.yaml``: ``merge_fn: adamerging``, ``granularity: task``).

Where FW-Hard steps toward one checkpoint with a fixed step size, FW-Soft's oracle picks one
checkpoint **per task** and the step is learned: layer-wise AdaMerging coefficients toward
the picked checkpoints. Over a pool θ_1..θ_n and the calibration tasks j = 1..J, from the base
``θ̄⁰ = θ₀``, each iteration t = 0..T−1:

1. per task, the gradient ``g_j = ∇L_j(θ̄ᵗ)`` of its cross-entropy on ``examples`` labelled
   examples (minibatch t of the task);
2. the task-wise oracle, task by task in the objective's order: ``m_j`` is the checkpoint with
   the lowest ``Σ_k cos(g_{j,k}, θ_{m,k})`` (cosines with the checkpoint's weights, as in
   FW-Hard) among those not picked yet in this iteration; it stops when every checkpoint
   is picked, so it picks ``S = min(J, n)`` of them;
3. the soft step: with one coefficient per picked checkpoint s and tensor k,

       θ̄ᵗ⁺¹_k = θ̄ᵗ_k + Σ_s λ_{s,k} (θ_{m_s,k} − θ̄ᵗ_k)

   where λ starts at ``ada_init`` (0.3, task arithmetic's scale) in the first iteration and at
   ``ada_coeff`` (1e-8) in every later one, and takes ``ada_iters`` Adam steps (learning rate
   ``ada_lr``) on the mean over the tasks of ``ada_loss`` (cross-entropy by default; the
   authors' is AdaMerging's entropy of the predictions, below) on ``ada_batch_size``
   examples per task and step. λ is not clamped
   or normalised (the authors' ``clamp_weights=False``).

There is no step size: the learned λ is the step (the ``step_size`` of ``fw_soft.yaml`` is
unused on the authors' AdaMerging path). Defaults are the authors' (10 iterations, 100
examples per task for each gradient, 500 Adam steps at learning rate 1e-3 on batches of 16
per task, λ from 0.3 then 1e-8) except the coefficients' loss: cross-entropy, where theirs
is the entropy. Their entropy adapts to the test split's inputs (test-time adaptation); on
the calibration split, the only data a merge reads here, it made the merge confident rather
than right: ACC 24.9 against 67.1 with cross-entropy on the digits pool of
``benchmarks/fw_pool.py`` (+0 irrelevant; 2026-12-07). ``ada_loss=entropy`` is theirs. Deterministic for a ``seed`` (it orders the
calibration rows; Adam has no randomness).

Memory does not grow with the pool: the oracle streams each checkpoint tensor by tensor
once per iteration (all J gradients are at the same θ̄ᵗ, so one pass scores every task), and
the soft step reads only the S picked checkpoints. It holds θ₀ and θ̄, the J gradients while
the oracle runs, then θ̄ᵗ, the S ≤ J directions ``θ_{m_s} − θ̄ᵗ`` and one merged model while λ
learns: about J + 4 copies of the model. That grows with the number of calibration tasks
(like ``batch_adamerging``, which holds every task vector, but per task rather than per
checkpoint), not with the pool's size.

Deviations from the authors' code. Three compute the same thing another way: the J
gradients are taken before any pick (theirs interleave the picks, at the same θ̄ᵗ), so the
pool is read once per iteration rather than J times; each gradient is one minibatch of
``examples`` rather than that many single-example backward passes (the same mean for a
model without batch statistics); the coefficients' loss is the tasks' mean, not their sum
(Adam is invariant to the factor up to its ε). Two change the data or the options: both
losses read the calibration split, the only data a merge may read here (the authors'
entropy reads the test split: test-time adaptation); their ``max_num_models`` cap and
their layer-wise oracle (``granularity: layer``) are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import (
    MethodParams,
    NarrowableObjective,
    Objective,
    ObjectiveOptions,
    Pool,
    PoolMethod,
)
from mergeflow.merging.methods.batch_adamerging import learn_layer_coefficients
from mergeflow.merging.methods.fw_merging import calibration_gradient, cos_sums, weights_of


class FWSoftParams(MethodParams):
    max_iters: int = Field(10, ge=1, description="Frank-Wolfe iterations T")
    examples: int = Field(
        100, ge=1, description="labelled calibration examples per task for each task's gradient"
    )
    ada_iters: int = Field(500, ge=1, description="Adam steps of each iteration's coefficients")
    ada_lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the coefficients")
    ada_batch_size: int = Field(16, ge=1, description="calibration examples per task and Adam step")
    ada_loss: Literal["entropy", "cross_entropy"] = Field(
        "cross_entropy",
        description="the coefficients' loss: cross-entropy on the labelled calibration data, or the authors' entropy",
    )
    ada_init: float = Field(0.3, description="starting coefficient in the first iteration")
    ada_coeff: float = Field(1e-8, description="starting coefficient in every later iteration")
    seed: int = Field(0, description="seed of the calibration rows' order")


def pick_per_task(scores: list[list[float]], n_tasks: int) -> list[int]:
    """The task-wise oracle: for task j in order, the checkpoint i with the lowest
    ``scores[i][j]`` among those not picked yet (the first on ties); stops when all are picked."""
    picked: list[int] = []
    for j in range(n_tasks):
        if len(picked) >= len(scores):
            break
        free = [i for i in range(len(scores)) if i not in picked]
        picked.append(min(free, key=lambda i: scores[i][j]))
    return picked


class FWSoft(PoolMethod[FWSoftParams]):
    name: ClassVar[str] = "fw_soft"
    summary: ClassVar[str] = (
        "FW-Merging (FW-Soft): Frank-Wolfe over a pool, one checkpoint per task picked by a "
        "linear oracle on that task's gradient, the step learned as AdaMerging coefficients"
    )
    Params = FWSoftParams

    def objective_options(self, params: FWSoftParams) -> ObjectiveOptions:
        """``examples`` labelled examples per task for each gradient, cross-entropy (the
        authors'); the coefficients' loss and batch are a view of it (``narrow``)."""
        return ObjectiveOptions(batch_size=params.examples, seed=params.seed, loss="cross_entropy")

    def merge(
        self, params: FWSoftParams, pool: Pool, objective: Objective, log: Callable[[str], None]
    ) -> dict[str, torch.Tensor]:
        """θ̄ − θ₀ after ``max_iters`` soft Frank-Wolfe steps (see the module docstring)."""
        if not isinstance(objective, NarrowableObjective):
            raise TypeError("fw_soft needs an objective with one loss per task (narrow)")
        tasks = objective.tasks
        per_task = [objective.narrow([name]) for name in tasks]
        soft = objective.narrow(loss=params.ada_loss, batch_size=params.ada_batch_size)
        base = {k: pool.base(k) for k in pool.keys}
        delta = {k: torch.zeros_like(b) for k, b in base.items()}  # θ̄ − θ₀
        names = pool.names or tuple(str(i) for i in range(pool.size))
        for t in range(params.max_iters):
            losses, grads = [], []
            for name, task in zip(tasks, per_task, strict=True):
                where = f"iteration {t + 1} (task {name!r})"
                loss, g = calibration_gradient(task, base, delta, t, where)
                losses.append(loss)
                grads.append(g)
            scores = [cos_sums(grads, weights_of(pool, base, i)) for i in range(pool.size)]
            del grads
            picked = pick_per_task(scores, len(tasks))
            start = {k: base[k] + delta[k] for k in pool.keys}
            dirs = [{k: pool.tau(i, k) - delta[k] for k in pool.keys} for i in picked]
            step, ada = learn_layer_coefficients(
                start,
                dirs,
                soft,
                init=params.ada_init if t == 0 else params.ada_coeff,
                steps=params.ada_iters,
                lr=params.ada_lr,
                first_step=t * params.ada_iters,
                what=f"iteration {t + 1}, Adam step",
                lr_name="ada_lr",
            )
            del start, dirs
            for k in pool.keys:
                delta[k] = delta[k] + step[k]
            chose = ", ".join(f"{tasks[j]}: {names[i]}" for j, i in enumerate(picked))
            log(
                f"iteration {t + 1}/{params.max_iters}: loss {sum(losses) / len(losses):.4f}, "
                f"chose {chose}; coefficients' loss {ada[0]:.4f} -> {ada[-1]:.4f}"
            )
        return delta
