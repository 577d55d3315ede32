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

Memory: ``M`` is never copied whole to float64. Its Gram and its float64 products (the
tail, the small columns) are summed and stacked over row blocks of at most
:data:`BLOCK_BYTES`; and :func:`_apply` builds the removed part in ``U``'s own buffer and,
where ``U`` has ``X``'s shape, the result too, summing ``X V`` over row blocks. So beside its
inputs a projection holds one ``m × k`` matrix plus blocks: for a 32000 x 4096 ``lm_head``
(500 MiB in float32) 0.9 GiB above its inputs, where a float64 copy and three float32
products took 1.7 GiB (measured on 2026-12-07). A matrix within one block is done in one go,
as before.

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
    k = numerical_rank(s, (m.shape[0], m.shape[1]))
    return _apply(x, u, vh.mT, split_rank(s, alpha), k)


def _apply(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """``X − U_r (U_rᵀ X V_r) V_rᵀ − Σ_{r≤i<k} (u_iᵀ X v_i) u_i v_iᵀ`` in ``x``'s dtype.

    ``u`` is consumed: the removed part ``L = [U_r B | u_i c_i]`` (``B = U_rᵀ X V_r``,
    ``c_i = u_iᵀ X v_i``) is built in its buffer, and where it has ``X``'s shape the result
    ``X − L V_kᵀ`` too, row block by row block; so the projection of a large matrix holds one
    ``m × k`` matrix beside its inputs (``X V`` is never whole). A matrix within one block
    (:data:`BLOCK_BYTES`) is done in one go.
    """
    u, v = u[:, :k].to(x.dtype), v[:, :k].to(x.dtype)
    r = min(r, k)
    blocks = _row_blocks(x, x.element_size())
    block, c = None, x.new_zeros(k - r)
    for a, b in blocks:  # B and c, summed over row blocks of X V
        xv = x[a:b] @ v
        ub = u[a:b]
        if r > 0:
            part = ub[:, :r].mT @ xv[:, :r]
            block = part if block is None else block.add_(part)
        c.add_(xv[:, r:].mul_(ub[:, r:]).sum(0))
        del xv
    out = u if u.shape == x.shape else torch.empty_like(x)
    for a, b in blocks:
        ub = u[a:b]
        if block is not None:
            ub[:, :r] = ub[:, :r] @ block
        ub[:, r:].mul_(c)
        out[a:b] = torch.addmm(x[a:b], ub, v.mT, alpha=-1)
    return out


BLOCK_BYTES = 1 << 27
"""Float64 row blocks of ``M`` are at most this large (128 MiB): a tall ``M`` is never copied
whole to float64 (a 32000 x 4096 ``lm_head`` would take 1 GiB), its Gram and its float64
products are summed and stacked block by block. A matrix within one block is done in one go."""


def _row_blocks(m: torch.Tensor, itemsize: int = 8) -> list[tuple[int, int]]:
    """Row ranges of ``m`` whose copies (float64 by default) fit :data:`BLOCK_BYTES`."""
    rows = max(1, BLOCK_BYTES // (itemsize * max(1, m.shape[1])))
    return [(i, min(i + rows, m.shape[0])) for i in range(0, m.shape[0], rows)]


def _mul64(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M V`` in float64, ``M`` converted one row block at a time."""
    v = v.to(torch.float64)
    return torch.cat([m[a:b].to(torch.float64) @ v for a, b in _row_blocks(m)])


def _gram_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of ``MᵀM``, in float64 (summed by row block)."""
    if m.device.type != "cpu":
        gt = m.new_zeros((m.shape[1], m.shape[1]), dtype=torch.float64)
        for i, j in _row_blocks(m):
            b = m[i:j].to(torch.float64)
            gt.addmm_(b.mT, b)
        return torch.linalg.eigh(gt)
    parts = iter(_row_blocks(m))
    i, j = next(parts)
    a = m[i:j].to(torch.float64).numpy()
    g = a.T @ a  # numpy runs Aᵀ·A as a symmetric rank-k update
    for i, j in parts:
        a = m[i:j].to(torch.float64).numpy()
        g += a.T @ a
    lam, v = np.linalg.eigh(g)
    return torch.from_numpy(lam), torch.from_numpy(v)


def thin_svd_by_gram(
    m: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(U_k, σ_k, V_k)`` of a tall ``m`` over its numerical rank k, ``U_k`` in ``dtype`` and
    ``σ_k, V_k`` in float64, or None when the kept spectrum spans more than
    ``GRAM_MAX_CONDITION`` (see the module doc: Gram + ``eigh``, the tail by Rayleigh-Ritz).
    """
    lam, v = _gram_eigh(m)
    lam, v = lam.flip(0), v.flip(1)  # descending
    s = lam.clamp_min(0).sqrt()
    head = int((s >= RITZ_SHARE * s[0]).sum())
    tail_w = None
    if head < s.numel():  # the tail: an SVD of M V_tail in float64 (m × (n − head))
        p, st, qh = torch.linalg.svd(_mul64(m, v[:, head:]), full_matrices=False)
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
        ws = w[:, small] if dtype == torch.float64 else _mul64(m, v[:, small])
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
    del svd  # _apply consumes U
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
