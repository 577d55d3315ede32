"""NUFILT: null-space filtering with a learned low-rank correction (arXiv 2509.21413, ICLR 2026),
as its authors' code does it (https://github.com/zihuanqiu/NUFILT,
``fusion_bench/method/nufilt/nufilt.py`` and ``fusion_bench/models/filter_lora.py``).

For each selected matrix at step t, with the previous merged task vector ``M = D_{t−1}`` and
the new task vector ``T = τ_t`` (``o × d``):

    U  = the top ``null_r`` right singular vectors of M,   P = I − U Uᵀ  (``null_space``; else I)
    V₁ = the top ``grad_r`` right singular vectors of T,   V₂ = U
    D_t = M + T (P + B A)

with ``A`` (``lora_r × d``, entries N(0, 0.02²), seeded per tensor) and ``B`` (``d × lora_r``,
zeros) trained from step 2 on for ``steps`` Adam steps (learning rate ``lr``) on the two
subspace-preservation losses

    ‖(T − D_t) V₁‖²_F + ‖(M − D_t) V₂‖²_F.

The new task's update enters only through input directions the merge has not used (P), and
the correction ``T B A`` restores what the new task needs in its own top directions (V₁)
without moving the merge in its top directions (V₂).

Selection (the authors' rule is CLIP module names containing ``attn`` or ``fc1``): here the
tensors the state's projection rule selects (every ``nn.Linear`` weight), narrowed to names
containing one of ``include`` when it is given (``include: [attn, fc1]`` is the authors'
CLIP rule). Every other tensor follows ``others``: ``base`` keeps θ₀, as the authors' code
does (it never touches them), ``average`` the running mean of the checkpoints. Scale: 1.

Two differences, both where the authors' code depends on an SVD's arbitrary basis: singular
vectors count only above the numerical rank (σ > σ₁·max(o, d)·ε of the compute dtype), so at
step 1 (``M = 0``) nothing is filtered and ``D_1 = τ_1`` on selected tensors, and a
low-rank M (a LoRA lineage) filters only its own directions; and ``A``'s random start is
seeded from ``seed`` and the tensor's name rather than drawn from one global stream in module
order. Singular subspaces come from the float64 Gram matrix's eigenvectors.
"""

from __future__ import annotations

import zlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from mergeflow.merging.methods.base import ContinualMethod, MethodParams, NoScalars, TensorStep
from mergeflow.merging.methods.weight_average import running_mean


class NUFILTParams(MethodParams):
    lora_r: int = Field(
        64, ge=0, le=4096, description="rank of the learned correction B A (0: none)"
    )
    null_r: int = Field(
        128, ge=0, le=65536, description="directions of the merge kept out of the new update"
    )
    grad_r: int = Field(
        8, ge=0, le=65536, description="directions of the new task the correction restores"
    )
    null_space: bool = Field(True, description="filter the new update by P = I − U Uᵀ")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the correction")
    steps: int = Field(50, ge=0, le=100_000, description="Adam steps of the correction per fold")
    seed: int = Field(42, description="seed of A's random start (with the tensor's name)")
    include: tuple[str, ...] = Field(
        (), description="name substrings narrowing the projected matrices (empty: all of them)"
    )
    others: Literal["base", "average"] = Field(
        "base", description="every other tensor: keep θ₀ (the authors') or the running mean"
    )


def top_right_vectors(w: torch.Tensor, k: int) -> torch.Tensor:
    """The top ``k`` right singular vectors of ``w`` above its numerical rank (``d × ≤k``).

    From the eigenvectors of the smaller float64 Gram matrix: ``wᵀw`` (d × d) when d ≤ o,
    else ``w wᵀ`` (o × o), whose eigenvectors u give ``v = wᵀu/σ``.
    """
    o, d = w.shape
    if k == 0:
        return w.new_zeros(d, 0)
    w64 = w.double()
    vals, vecs = torch.linalg.eigh(w64.T @ w64 if d <= o else w64 @ w64.T)  # ascending σ²
    sigma = vals.flip(0).clamp(min=0).sqrt()
    tol = float(sigma[0]) * max(o, d) * torch.finfo(w.dtype).eps
    keep = min(k, int((sigma > tol).sum()) if float(sigma[0]) > 0 else 0)
    top = vecs.flip(1)[:, :keep]
    if d > o:
        top = (w64.T @ top) / sigma[:keep]
    return top.to(w.dtype)


def nufilt_update(
    prev: torch.Tensor, tau: torch.Tensor, p: NUFILTParams, generator: torch.Generator
) -> torch.Tensor:
    """``D_t = M + T (P + B A)`` for one matrix (see the module docstring)."""
    u = top_right_vectors(prev, p.null_r) if p.null_space else prev.new_zeros(prev.shape[1], 0)
    filtered = tau - (tau @ u) @ u.T  # T P
    if p.lora_r == 0 or p.steps == 0:
        return prev + filtered
    v1 = top_right_vectors(tau, p.grad_r)
    v2 = u if p.null_space else top_right_vectors(prev, p.null_r)
    d = tau.shape[1]
    a = torch.nn.Parameter(
        (torch.randn(p.lora_r, d, generator=generator, dtype=torch.float32) * 0.02).to(tau)
    )
    b = torch.nn.Parameter(tau.new_zeros(d, p.lora_r))
    # Residuals before the correction, in each subspace: (T − M − T P) V₁ and (M − M − T P) V₂.
    r1 = (tau - prev - filtered) @ v1
    r2 = -(filtered @ v2)
    t_v = (tau, v1, r1), (tau, v2, r2)
    opt = torch.optim.Adam([a, b], lr=p.lr)
    for _ in range(p.steps):
        opt.zero_grad()
        loss = sum(((r - t @ (b @ (a @ v))) ** 2).sum() for t, v, r in t_v if v.shape[1] > 0)
        if not isinstance(loss, torch.Tensor):  # both subspaces empty: nothing to learn
            break
        loss.backward()
        opt.step()
    with torch.no_grad():
        return prev + filtered + (tau @ b) @ a


class NUFILT(ContinualMethod[NUFILTParams, NoScalars]):
    name: ClassVar[str] = "nufilt"
    summary: ClassVar[str] = (
        "null-space filtering: the new update avoids the merge's top input directions, plus a learned low-rank correction"
    )
    Params = NUFILTParams

    def selected(self, params: NUFILTParams, s: TensorStep) -> bool:
        """Whether NUFILT updates this tensor (projected, 2-D, and matching ``include``)."""
        return (
            s.projected
            and s.tau.ndim == 2
            and (not params.include or any(x in s.key for x in params.include))
        )

    def fold_tensor(self, params: NUFILTParams, s: TensorStep) -> torch.Tensor:
        """D_1 = τ_1 (selected) or the ``others`` rule; then the NUFILT update of selected matrices."""
        if not self.selected(params, s):
            return running_mean(s) if params.others == "average" else torch.zeros_like(s.tau)
        if s.prev is None:
            return s.tau.clone()
        g = torch.Generator().manual_seed(params.seed * 1_000_003 + zlib.crc32(s.key.encode()))
        with torch.enable_grad():
            return nufilt_update(s.prev, s.tau, params, g).to(s.prev.dtype)

    def elementwise(self, params: NUFILTParams, projected: bool) -> bool:
        return not projected
