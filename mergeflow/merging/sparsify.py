"""Magnitude trimming shared by the TIES-style methods: per tensor, or exact global top-k."""

from __future__ import annotations

import math

import torch

from mergeflow.merging.tensors import TauPass


def tensor_threshold(tau: torch.Tensor, density: float) -> float:
    """The magnitude of the ``ceil(density·n)``-th largest entry of ``tau`` (inf when none is kept)."""
    n = tau.numel()
    k = math.ceil(density * n)
    if k <= 0 or n == 0:
        return math.inf
    a = tau.detach().abs().reshape(-1)
    return float(torch.kthvalue(a.float().cpu(), n - k + 1).values)


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries of ``tau`` whose magnitude is below ``threshold`` (ties at it are kept)."""
    return torch.where(
        tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)
    )


def global_threshold(taus: TauPass, density: float) -> float:
    """Exact magnitude of the ``ceil(density·N)``-th largest entry over all tensors, in two passes.

    Pass 1 builds a 65 536-bin histogram of the top 16 bits of each |τ| as float32
    (non-negative floats order like their bit patterns); pass 2 collects only the
    entries of the bin holding the k-th largest and selects it exactly.
    """
    hist = torch.zeros(65536, dtype=torch.int64)
    total = 0
    for _, t in taus():
        bits = t.detach().abs().float().cpu().reshape(-1).view(torch.int32) >> 16
        hist += torch.bincount(bits, minlength=65536)
        total += bits.numel()
    k = math.ceil(density * total)
    if k <= 0:
        return math.inf
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count with bin >= b
    b = int(torch.nonzero(above >= k).max())
    need = k - (int(above[b + 1]) if b + 1 < 65536 else 0)
    vals = []
    for _, t in taus():
        a = t.detach().abs().float().cpu().reshape(-1)
        vals.append(a[(a.view(torch.int32) >> 16) == b])
    v = torch.cat(vals)
    return float(torch.topk(v, need).values.min())
