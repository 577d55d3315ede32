"""Task vectors and the per-tensor helpers every pass shares: devices, dtypes, compatibility
checks, τ = θ_t − θ₀ with its NaN/Inf refusal, the blocked elementwise fold, and the norms."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging.state import FoldOptions
from mergeflow.merging.tensors import TensorReader

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto``: cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda")
    return torch.device(device)


def merged_keys(base: TensorReader) -> list[str]:
    """Names of the base tensors that are merged: every floating-point tensor."""
    keys = [k for k in base.keys() if base.meta(k).is_float]
    if not keys:
        raise CheckpointError(base.source, "the base has no floating-point tensors to merge")
    return keys


def check_compatible(
    base: TensorReader, checkpoint: TensorReader, options: FoldOptions
) -> list[str]:
    """Check names, shapes and dtypes from headers alone; return the checkpoint's extra (head) tensors."""
    ck = set(checkpoint.keys())
    missing = []
    for k in merged_keys(base):
        if k not in ck:
            missing.append(k)
            continue
        bm, cm = base.meta(k), checkpoint.meta(k)
        if bm.shape != cm.shape:
            raise CheckpointError(
                checkpoint.source,
                f"tensor {k!r} has shape {list(cm.shape)} but the base has {list(bm.shape)}",
            )
        if not cm.is_float:
            raise CheckpointError(
                checkpoint.source,
                f"tensor {k!r} has dtype {cm.dtype} but the base has floating-point {bm.dtype}",
            )
    if missing and options.missing == "error":
        few = ", ".join(repr(k) for k in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            checkpoint.source,
            f"{len(missing)} tensor(s) of the base are missing from the checkpoint ({few}{more}); "
            "allow missing tensors (CLI --allow-missing, lineage allow_missing: true) to treat "
            "them as zero task vectors",
        )
    if len(missing) == len(merged_keys(base)):
        raise CheckpointError(checkpoint.source, "the checkpoint shares no tensor with the base")
    base_keys = set(base.keys())
    return [k for k in checkpoint.keys() if k not in base_keys]


def _finite(t: torch.Tensor, source: str, key: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(source, f"tensor {key!r} contains NaN or Inf values")


def _task_vector(
    source: str,
    raw: torch.Tensor | None,
    key: str,
    b: torch.Tensor,
    cdt: torch.dtype,
    check: bool = True,
) -> torch.Tensor:
    """τ = θ_t − θ₀ for one tensor, a fresh tensor in ``cdt``; a tensor absent from the
    checkpoint (allowed by options) is zero. ``check``: refuse NaN/Inf in the checkpoint."""
    if raw is None:
        return torch.zeros_like(b)
    c = raw.to(b.device)
    if torch.promote_types(c.dtype, b.dtype) == b.dtype:
        tau = torch.sub(c, b)  # upcast inside the subtraction: one pass, no cast copy
    else:
        tau = c.to(cdt) - b  # never in place: a reader may hand out tensors it keeps
    if check and not bool(torch.isfinite(tau.sum())):  # a read-only pass; then say which
        _finite(c, source, key)
        if not bool(torch.isfinite(tau).all()):
            raise CheckpointError(source, f"tensor {key!r} overflows against the base")
    return tau


BLOCK = 1 << 18
"""Entries per block of the CPU's blocked passes (an elementwise fold, a linear batch merge):
1 MiB of float32 per buffer, so a block stays in the core's cache."""


@dataclass(frozen=True)
class FoldSums:
    """Float64 sums of squares over the tensors a fold pass folded: ``‖D_t‖²``, ``‖τ_t‖²`` and,
    when the pass was asked for it, ``‖θ₀‖²`` (the task-vector ratio's denominator)."""

    state: float
    task_vector: float
    base: float | None = None

    def __add__(self, other: FoldSums) -> FoldSums:
        base = None if self.base is None or other.base is None else self.base + other.base
        return FoldSums(self.state + other.state, self.task_vector + other.task_vector, base)


def task_vector_ratio(sums: FoldSums) -> float:
    """``‖τ‖/‖θ₀‖`` over the folded tensors (0 when the base is all zeros and τ is too)."""
    if sums.base is None:
        raise ValueError("the fold pass did not sum ‖θ₀‖² (base_norm=False)")
    if sums.base == 0.0:
        return 0.0 if sums.task_vector == 0.0 else math.inf
    return math.sqrt(sums.task_vector / sums.base)


def check_task_vector_ratio(sums: FoldSums, limit: float, source: str) -> float:
    """Refuse a checkpoint whose ``‖τ‖/‖θ₀‖`` exceeds ``limit``; returns the ratio.

    A checkpoint with the base's shapes but trained from another base has a task vector as
    large as the weights themselves (about √2 for an independent base of the same
    initialisation), while real fine-tunes sit far below 0.5.
    """
    ratio = task_vector_ratio(sums)
    if ratio > limit:
        raise CheckpointError(
            source,
            f"its task vector is {ratio:.3g}x the base's norm (‖τ‖/‖θ₀‖), above "
            f"max_task_vector_ratio {limit:g}: it was most likely not fine-tuned from this base "
            "(raise the limit, or turn it off: lineage max_task_vector_ratio: null, CLI "
            "--max-task-vector-ratio none, to fold it anyway)",
        )
    return ratio


def _fold_in_blocks(
    step: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
    raw_b: torch.Tensor,
    raw_c: torch.Tensor | None,
    raw_prev: torch.Tensor | None,
    cdt: torch.dtype,
    base_norm: bool = False,
) -> tuple[torch.Tensor, float, float, float]:
    """An elementwise fold, :data:`BLOCK` entries at a time: ``(D_t, ‖D_t‖², ‖τ_t‖², ‖θ₀‖²)``.

    τ, the method's step and the squared norms are computed while a block is in the core's
    cache, so each input is read from memory once and no whole-tensor temporary is made
    (16-bit inputs are upcast block by block). ``‖τ_t‖²`` is not finite when an input is not;
    ``‖θ₀‖²`` is summed only when ``base_norm`` (0 otherwise).
    """
    n = raw_b.numel()
    size = max(1, min(n, BLOCK))
    bf = raw_b.reshape(-1)
    cf = raw_c.reshape(-1) if raw_c is not None else None
    pf = raw_prev.reshape(-1) if raw_prev is not None else None
    out = torch.empty(n, dtype=cdt)
    tau_buf, base_buf = torch.empty(size, dtype=cdt), torch.empty(size, dtype=cdt)
    prev_buf = torch.empty(size, dtype=cdt) if pf is not None and pf.dtype != cdt else None
    sq_tau = sq_new = sq_base = 0.0
    for a in range(0, n, size):
        e = min(a + size, n)
        tau = tau_buf[: e - a]
        if base_norm or cf is not None:
            b = base_buf[: e - a].copy_(bf[a:e])
            if base_norm:
                sq_base += float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
        if cf is None:
            tau.zero_()
        else:
            tau.copy_(cf[a:e]).sub_(b)
        sq_tau += float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
        prev = None if pf is None else pf[a:e]
        if prev is not None and prev_buf is not None:
            prev = prev_buf[: e - a].copy_(prev)
        new = out[a:e].copy_(step(prev, tau))
        sq_new += float(torch.linalg.vector_norm(new, dtype=torch.float64)) ** 2
    return out.reshape(raw_b.shape), sq_new, sq_tau, sq_base


def _sizes(reader: TensorReader, keys: Sequence[str]) -> dict[str, int]:
    """Element counts from headers: what the pipeline may hold in memory at once."""
    return {k: reader.meta(k).numel for k in keys}


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """A progress bar on stderr (hidden unless ``progress``)."""
    return tqdm(
        total=total, desc=desc, unit="tensor", disable=not progress, file=sys.stderr, leave=False
    )


def screen_task_vector_ratio(
    base: TensorReader, checkpoint: TensorReader, options: FoldOptions, limit: float
) -> float:
    """:func:`check_task_vector_ratio` from a pass of its own over the merged tensors (one tensor
    of each input at a time), for merges whose math does not sum the norms as it reads."""
    present = set(checkpoint.keys())
    cdt = DTYPES[options.compute_dtype]
    sq_tau = sq_base = 0.0
    for k in merged_keys(base):
        b = base.get(k).to(cdt)
        sq_base += float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
        if k in present:
            tau = _task_vector(checkpoint.source, checkpoint.get(k), k, b, cdt)
            sq_tau += float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
    return check_task_vector_ratio(FoldSums(0.0, sq_tau, sq_base), limit, checkpoint.source)
