"""The OPCM projection, computed exactly and fast: float64 Gram + ``eigh``, or a float64 SVD.

OPCM (Tang et al. 2025, https://arxiv.org/abs/2501.09522) projects a new task vector ``X``
against the previous merged update ``M = U Σ Vᵀ`` (thin SVD, ``k = min(m, n)``)::

    X̃ = X − U_r (U_rᵀ X V_r) V_rᵀ − Σ_{i=r}^{k−1} (u_iᵀ X v_i) u_i v_iᵀ

with ``r`` the split rank of :func:`split_rank`. The singular vectors are what must be exact:
OPCM's diagonal terms depend on each ``u_i, v_i``, and float32 cannot separate clustered
singular values. So for a tall ``M`` (``m ≥ n``; a wide one is transposed, which maps the
projection onto itself) ``decomposition="auto"`` computes them in float64 from the small
Gram matrix, ``G = MᵀM = V Σ² Vᵀ`` (``n × n``, ``eigh``), and ``U = M V Σ⁻¹``; the products
with ``X`` then run in the compute dtype (float32 unless the state is float64), whose
rounding the state is stored in anyway. That is faster than a float32 SVD and as exact as a
float64 one.

Where the time goes (benchmarks/README.md): on a CPU, ``G`` and ``eigh`` go through numpy's
LAPACK (OpenBLAS: numpy calls ``AᵀA`` as a symmetric rank-k update, half a product's flops
but no faster than the product here, 9.5 vs 10.3 ms at 768x768 on 2026-12-07; with two
one-thread workers, as a fold runs, the projections took 1356 ms where torch's MKL path took
1656 ms on an AMD CPU; on the Intel CPU of 2026-12-06 numpy's Gram with torch's ``eigh`` was
level with numpy's), and ``M V`` runs
in float32 except for the columns with ``σ_i < 10⁻²·σ_max``, which are recomputed in float64:
a float32 column is exact to about ``ε₃₂·σ_max/σ_i``, so every column of ``U`` stays exact to
~10⁻⁵ relative. ``σ_i`` is ``√λ_i`` above that share (exact to ``ε·(σ_max/σ_i)²`` ≤ 10⁻¹²)
and ``‖M v_i‖`` in float64 below it (``ε·κ``, not ``ε·κ²``), so no pass over ``M V`` is added.

The tail: ``eigh`` of ``G`` gives the directions with tiny ``σ_i`` exactly only as a subspace
(the eigenvalues of ``G`` are exact to ``ε·σ_max²``, so close tiny ``σ_i`` mix, and a null
direction's ``√λ_i`` is about ``√ε·σ_max`` instead of 0). So the directions with
``σ_i < RITZ_SHARE·σ_max`` (``V_t``) are resolved by a float64 SVD of the ``m × |t|`` matrix
``M V_t = P S Qᵀ`` (Rayleigh-Ritz): ``u = P``, ``σ = S``, ``v = V_t Q``. Inside the tail that
is as exact as a full float64 SVD; what leaks in from the head is at most
``ε·σ_max/RITZ_SHARE`` in ``M v_i``. The noise of a square task vector puts one or a few
``σ_i`` five or six decades below ``σ_max`` (10 of the 48 square matrices of the ViT-B/32
benchmark's first fold had ``σ_max/σ_min > 10⁵``, which sent the first version of this path
to a full float64 SVD): now they cost an SVD of ``768 × a few``. A low-rank update (a LoRA
adapter's first fold) keeps this path too, its null directions put at ``ε`` level by the
tail's SVD. The share is not larger because a tail that takes a whole noise bulk costs as
much as the full SVD (at 10⁻³ the benchmark's clustered accuracy fixture folded 1.5x slower).

Edge cases:

* **rank deficiency**: directions with ``σ_i ≤ max(m, n)·ε·σ_max`` (LAPACK's numerical rank
  rule, float64 ε, applied to the tail's SVD) carry no diagonal term: any orthonormal
  completion of the null space is a valid SVD there, so the paper's projection is undefined
  on it and mergeflow removes nothing;
* **ill conditioning**: when the kept spectrum spans more than ``GRAM_MAX_CONDITION`` the
  projection falls back to a float64 SVD of the tall orientation (``decomposition="auto"``);
* ``M = 0`` (a frozen layer) returns ``X`` unchanged.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Decomposition = Literal["auto", "svd64", "svd32"]
"""``auto``: float64 Gram + eigh, float64 SVD where ill-conditioned; ``svd64``: always a float64
SVD (the reference); ``svd32``: a float32 SVD, the precision of the research code."""

GRAM_MAX_CONDITION = 1e6
"""Largest σ_max/σ_min (kept directions) the Gram path accepts. The tail (σ_i < RITZ_SHARE·σ_max)
is resolved by an SVD of ``M V_tail``, whose leak from the head is at most ε·σ_max/RITZ_SHARE, so
at 1e6 every kept ``u_i`` is still exact to about 2e-6."""

RITZ_SHARE = 1e-4
"""Directions with ``σ_i < RITZ_SHARE·σ_max`` (the tail) get their singular pairs from a float64
SVD of the ``m × tail`` matrix ``M V_tail``: ``eigh`` of the Gram matrix is exact there only as
a subspace."""

_EPS64 = torch.finfo(torch.float64).eps

W32_MIN_SHARE = 1e-2
"""Columns of ``M V`` with ``σ_i ≥ W32_MIN_SHARE·σ_max`` are computed in float32, the rest in float64."""


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """0-based first index where the cumulative singular-value share exceeds ``alpha``."""
    share = torch.cumsum(s, 0) / s.sum()
    return int(torch.argmax((share > alpha).to(torch.int8)).item())


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values (descending) exceed ``max(m, n)·ε·σ_max`` (float64 ε)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    tol = max(shape) * _EPS64 * float(s[0])
    return int((s > tol).sum())


def _by_svd(x: torch.Tensor, m: torch.Tensor, alpha: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return _apply(x, u, vh.mT, split_rank(s, alpha), numerical_rank(s, (m.shape[0], m.shape[1])))


def _apply(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """``X − U_r (U_rᵀ X V_r) V_rᵀ − Σ_{r≤i<k} (u_iᵀ X v_i) u_i v_iᵀ`` in ``x``'s dtype."""
    u, v = u[:, :k].to(x.dtype), v[:, :k].to(x.dtype)
    r = min(r, k)
    left = x @ v  # X V (m × k), then in place [U_r (U_rᵀ X V_r) | u_i·(u_iᵀ X v_i)] ...
    block = u[:, :r].mT @ left[:, :r] if r > 0 else None
    tail = left[:, r:].mul_(u[:, r:])
    torch.mul(u[:, r:], tail.sum(0), out=tail)  # u_iᵀ X v_i, i ≥ r
    if block is not None:
        torch.mm(u[:, :r], block, out=left[:, :r])
    return torch.addmm(x, left, v.mT, alpha=-1)  # ... so the removed part is one product


def _gram_eigh(m64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of ``MᵀM``, in float64."""
    if m64.device.type != "cpu":
        return torch.linalg.eigh(m64.mT @ m64)
    a = m64.numpy()
    lam, v = np.linalg.eigh(a.T @ a)  # numpy runs Aᵀ·A as a symmetric rank-k update
    return torch.from_numpy(lam), torch.from_numpy(v)


def thin_svd_by_gram(
    m: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(U_k, σ_k, V_k)`` of a tall ``m`` over its numerical rank k, ``U_k`` in ``dtype`` and
    ``σ_k, V_k`` in float64, or None when the kept spectrum spans more than
    ``GRAM_MAX_CONDITION`` (see the module doc: Gram + ``eigh``, the tail by Rayleigh-Ritz).
    """
    m64 = m.to(torch.float64)
    lam, v = _gram_eigh(m64)
    lam, v = lam.flip(0), v.flip(1)  # descending
    s = lam.clamp_min(0).sqrt()
    head = int((s >= RITZ_SHARE * s[0]).sum())
    tail_w = None
    if head < s.numel():  # the tail: an SVD of M V_tail in float64 (m × (n − head))
        p, st, qh = torch.linalg.svd(m64 @ v[:, head:], full_matrices=False)
        v = torch.cat([v[:, :head], v[:, head:] @ qh.mT], 1)
        s = torch.cat([s[:head], st])
        tail_w = p
    k = numerical_rank(s, (m.shape[0], m.shape[1]))
    if k == 0:  # M = 0 (or below float64's range in G)
        return m.new_zeros((m.shape[0], 0), dtype=dtype), s[:0], v[:, :0]
    if float(s[0]) > GRAM_MAX_CONDITION * float(s[k - 1]):
        return None
    s, v, h = s[:k], v[:, :k], min(head, k)
    w = m.to(dtype) @ v[:, :h].to(dtype)  # U Σ in the compute dtype, ...
    small = (s[:h] < W32_MIN_SHARE * s[0]).nonzero().squeeze(1)
    if small.numel():  # ... where that is not exact, float64; there σ_i = ‖M v_i‖ (ε·κ, not ε·κ²)
        ws = w[:, small] if dtype == torch.float64 else m64 @ v[:, small]
        s[small] = torch.linalg.vector_norm(ws, dim=0)
        if dtype != torch.float64:
            w[:, small] = ws.to(dtype)
    u = w.div_(s[:h].to(dtype))
    if tail_w is not None and k > h:
        u = torch.cat([u, tail_w[:, : k - h].to(dtype)], 1)
    return u, s, v


def _by_gram(x: torch.Tensor, m: torch.Tensor, alpha: float) -> torch.Tensor | None:
    """The projection through :func:`thin_svd_by_gram`; None when ``M`` is too ill-conditioned."""
    svd = thin_svd_by_gram(m, x.dtype)
    if svd is None:
        return None
    u, s, v = svd
    if s.numel() == 0:
        return x
    return _apply(x, u, v, split_rank(s, alpha), s.numel())


def project(
    x: torch.Tensor, m: torch.Tensor, alpha: float, decomposition: Decomposition = "auto"
) -> torch.Tensor:
    """The OPCM projection ``X̃`` of ``x`` against ``m`` (see the module doc), in ``x``'s dtype."""
    out_dtype = x.dtype
    if not torch.any(m):
        return x
    work = torch.float64 if x.dtype == torch.float64 or decomposition == "svd64" else torch.float32
    xd, md = x.to(work), m
    if md.shape[0] < md.shape[1]:
        return project(x.mT, m.mT, alpha, decomposition).mT
    res = _by_gram(xd, md, alpha) if decomposition == "auto" else None
    if res is None:
        dt = torch.float32 if decomposition == "svd32" else torch.float64
        res = _by_svd(xd.to(dt), md.to(dt), alpha)
    return res.to(out_dtype)
