"""The streaming fold engine.

Every pass walks the base's tensor names once and holds one tensor of each input
at a time, so memory depends on the largest tensor, not on the model size or the
number of folded checkpoints. IO happens only through the reader/writer protocols
of :mod:`mergeflow.merging.tensors`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from mergeflow.errors import CheckpointError, ConfigError, StateError
from mergeflow.merging import pipeline
from mergeflow.merging.methods import get_continual, validate_params
from mergeflow.merging.methods.base import (
    ContinualMethod,
    FoldStats,
    MethodParams,
    MethodScalars,
    TensorStep,
)
from mergeflow.merging.pipeline import default_workers
from mergeflow.merging.projection import ProjectionRule
from mergeflow.merging.state import BaseRef, FoldedCheckpoint, FoldOptions, StateInfo
from mergeflow.merging.tensors import SAFETENSORS_DTYPES, TensorReader, TensorWriter

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
            f"its task vector is {ratio:.3g}x the base's norm (‖τ‖/‖θ₀‖), above the "
            f"lineage's max_task_vector_ratio {limit:g}: it was most likely not fine-tuned "
            "from this base (raise max_task_vector_ratio, or set it to null, to fold it anyway)",
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


def new_state(
    method: str,
    params: Mapping[str, object],
    base: BaseRef,
    projection: ProjectionRule,
    options: FoldOptions | None = None,
) -> StateInfo:
    """An empty (step 0) state for a continual method; parameters are validated here."""
    p = validate_params(get_continual(method), params)
    return StateInfo(
        method=method,
        params=p.model_dump(),
        base=base,
        projection=projection,
        options=options or FoldOptions(),
    )


@dataclass(frozen=True)
class FoldPlan:
    """A validated fold of one checkpoint: what :func:`fold_tensors` and :func:`finish_fold` need.

    ``prepared`` holds the method's whole-model pre-pass results (plain floats), so a plan
    can be shipped to other workers that fold disjoint groups of ``keys``.
    """

    checkpoint_id: str
    digest: str
    step: int
    keys: tuple[str, ...]
    heads: tuple[str, ...]
    prepared: dict[str, float]


def _continual(info: StateInfo) -> tuple[ContinualMethod[Any, Any], MethodParams]:
    """The state's method and its validated parameters."""
    try:
        cm = get_continual(info.method)
    except ConfigError as e:
        raise StateError(f"the state's method: {e}") from None
    return cm, validate_params(cm, info.params)


def _scalars(cm: ContinualMethod[Any, Any], info: StateInfo) -> MethodScalars:
    """The state's scalars (JSON on disk) validated into the method's Scalars model."""
    try:
        return cm.Scalars.model_validate(info.scalars)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise StateError(
            f"the state's scalars do not fit method {info.method!r}: {problems}"
        ) from None


def plan_fold(
    info: StateInfo,
    base: TensorReader,
    checkpoint: TensorReader,
    *,
    checkpoint_id: str,
    digest: str,
    device: str | None = "cpu",
) -> FoldPlan:
    """Validate a fold from headers (duplicates, names, shapes, dtypes) and run the method's pre-pass."""
    cm, params = _continual(info)
    _scalars(cm, info)  # a state that does not fit its method fails before the pass
    done = info.folded(checkpoint_id, digest)
    if done is not None:
        raise StateError(
            f"checkpoint {checkpoint_id} (digest {digest}) is already folded as step {done.step} ({done.id})"
        )
    heads = check_compatible(base, checkpoint, info.options)
    keys = merged_keys(base)
    dev, cdt = resolve_device(device), DTYPES[info.options.compute_dtype]
    present = set(checkpoint.keys())

    def taus() -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            b = base.get(k).to(dev, cdt)
            raw = checkpoint.get(k) if k in present else None
            yield k, _task_vector(checkpoint.source, raw, k, b, cdt)

    prepared = cm.prepare(params, taus) or {}
    return FoldPlan(checkpoint_id, digest, info.step + 1, tuple(keys), tuple(heads), prepared)


def fold_tensors(
    info: StateInfo,
    plan: FoldPlan,
    state: TensorReader | None,
    base: TensorReader,
    checkpoint: TensorReader,
    out: TensorWriter,
    *,
    keys: Sequence[str] | None = None,
    device: str | None = "cpu",
    progress: bool = False,
    base_norm: bool = False,
) -> FoldSums:
    """Fold ``keys`` (default: all of the plan's) into ``out`` without committing it.

    Returns the partial sums over those tensors, for :func:`finish_fold`; ``base_norm`` adds
    ``‖θ₀‖²`` (from the base tensors the fold reads anyway) for the task-vector ratio.
    """
    cm, params = _continual(info)
    if (info.step > 0) != (state is not None):
        raise StateError("a state at step > 0 needs its tensors, and a step-0 state has none")
    dev, cdt = resolve_device(device), DTYPES[info.options.compute_dtype]
    present = set(checkpoint.keys())
    todo = list(plan.keys if keys is None else keys)
    sums = [0.0, 0.0, 0.0]
    bar = _bar(len(todo), f"fold {plan.checkpoint_id}", progress)

    def load(k: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        c = checkpoint.get(k) if k in present else None
        return base.get(k), c, state.get(k) if state is not None else None

    def refuse(k: str, b: torch.Tensor, c: torch.Tensor | None) -> NoReturn:
        """‖τ‖² was not finite: name the input with NaN/Inf, else the overflow."""
        _finite(b, base.source, k)
        _finite(c if c is not None else b, checkpoint.source, k)
        raise CheckpointError(checkpoint.source, f"tensor {k!r} overflows against the base")

    def compute(
        k: str, loaded: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    ) -> tuple[torch.Tensor, float, float, float]:
        raw_b, raw_c, raw_prev = loaded
        projected = info.projection.is_projected(k)
        if dev.type == "cpu" and cm.elementwise(params, projected):
            new, sq_new, sq_tau, sq_base = _fold_in_blocks(
                lambda prev, tau: cm.fold_tensor(
                    params, TensorStep(k, plan.step, prev, tau, projected, plan.prepared)
                ),
                raw_b,
                raw_c,
                raw_prev,
                cdt,
                base_norm,
            )
            if not math.isfinite(sq_tau):
                refuse(k, raw_b, raw_c)
            return new, sq_new, sq_tau, sq_base
        b = raw_b.to(dev).to(cdt)  # upcast (bf16 -> compute dtype) on the device
        sq_base = float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2 if base_norm else 0.0
        tau = _task_vector(checkpoint.source, raw_c, k, b, cdt, check=False)
        sq_tau = float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
        if not math.isfinite(sq_tau):  # one pass finds NaN/Inf in either input; then say which
            refuse(k, b, raw_c)
        prev = raw_prev.to(dev).to(cdt) if raw_prev is not None else None
        new = cm.fold_tensor(
            params,
            TensorStep(k, plan.step, prev, tau, projected, plan.prepared),
        ).to(cdt)
        sq_new = float(torch.linalg.vector_norm(new, dtype=torch.float64)) ** 2
        return new.cpu(), sq_new, sq_tau, sq_base

    def consume(k: str, result: tuple[torch.Tensor, float, float, float]) -> None:
        tensor, *squares = result
        out.add(k, tensor)
        for i, sq in enumerate(squares):
            sums[i] += sq
        bar.update()

    try:
        pipeline.run(
            todo, load, compute, consume, sizes=_sizes(base, todo), workers=default_workers(dev)
        )
    finally:
        bar.close()
    return FoldSums(sums[0], sums[1], sums[2] if base_norm else None)


def finish_fold(
    info: StateInfo,
    plan: FoldPlan,
    sums: FoldSums,
    source: str,
    max_task_vector_ratio: float | None = None,
) -> StateInfo:
    """The method's scalar epilogue on the summed norms; returns the new state's JSON half.

    With ``max_task_vector_ratio``, first refuses a checkpoint above it
    (:func:`check_task_vector_ratio`; ``sums`` must then hold ``‖θ₀‖²``).
    """
    if max_task_vector_ratio is not None:
        check_task_vector_ratio(sums, max_task_vector_ratio, source)
    cm, params = _continual(info)
    stats = FoldStats(plan.step, sums.state, sums.task_vector)
    scalars, scale = cm.finish(params, _scalars(cm, info), stats)
    if not math.isfinite(scale):
        raise CheckpointError(
            source, "the fold produced a non-finite scale; the checkpoint's values are too large"
        )
    cid = plan.checkpoint_id
    return info.model_copy(
        update={
            "step": plan.step,
            "scale": scale,
            "scalars": scalars.model_dump(),
            "checkpoints": (
                *info.checkpoints,
                FoldedCheckpoint(id=cid, digest=plan.digest, step=plan.step),
            ),
            "heads": {**info.heads, cid: plan.heads} if plan.heads else dict(info.heads),
        }
    )


def state_metadata(step: int) -> dict[str, str]:
    """safetensors metadata of state tensor files."""
    return {"mergeflow.state": "tensors", "mergeflow.step": str(step)}


def fold(
    info: StateInfo,
    state: TensorReader | None,
    base: TensorReader,
    checkpoint: TensorReader,
    *,
    checkpoint_id: str,
    digest: str,
    out: TensorWriter,
    heads_out: TensorWriter | None = None,
    device: str | None = "cpu",
    progress: bool = False,
    max_task_vector_ratio: float | None = None,
) -> StateInfo:
    """Fold one checkpoint into a state, streaming; returns the new state's JSON half.

    Writes the new state tensors to ``out`` and the checkpoint's tensors that the base
    lacks (task heads) to ``heads_out``; commits both only when the whole pass
    succeeded and aborts both otherwise. The input state is never modified.
    ``max_task_vector_ratio`` refuses a checkpoint from another base before anything is
    committed, from norms summed during the same pass (no extra read).
    """
    writers = [w for w in (out, heads_out) if w is not None]
    try:
        plan = plan_fold(
            info, base, checkpoint, checkpoint_id=checkpoint_id, digest=digest, device=device
        )
        sums = fold_tensors(
            info,
            plan,
            state,
            base,
            checkpoint,
            out,
            device=device,
            progress=progress,
            base_norm=max_task_vector_ratio is not None,
        )
        new_info = finish_fold(info, plan, sums, checkpoint.source, max_task_vector_ratio)
        if heads_out is not None:
            for k in plan.heads:
                heads_out.add(k, checkpoint.get(k))
        out.commit(state_metadata(plan.step))
        if heads_out is not None:
            heads_out.commit({"mergeflow.checkpoint": checkpoint_id})
        return new_info
    except BaseException:
        for w in writers:
            w.abort()
        raise


def output_metadata(info: StateInfo) -> dict[str, str]:
    """safetensors metadata recorded in every exported model."""
    return {
        "mergeflow.method": info.method,
        "mergeflow.params": json.dumps(info.params, sort_keys=True),
        "mergeflow.step": str(info.step),
        "mergeflow.scale": repr(info.scale),
        "mergeflow.checkpoints": json.dumps([c.id for c in info.checkpoints]),
        "mergeflow.projection": json.dumps(
            {
                "kind": info.projection.kind,
                "description": info.projection.description,
                "count": len(info.projection.projected),
            }
        ),
    }


def _out_dtype(b: torch.Tensor, dtype: str | None) -> torch.dtype:
    if dtype is None:
        return b.dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown output dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def export(
    info: StateInfo,
    state: TensorReader | None,
    base: TensorReader,
    out: TensorWriter,
    *,
    dtype: str | None = None,
    device: str | None = "cpu",
    progress: bool = False,
) -> None:
    """Write the merged model ``θ₀ + s·D`` with the base's names (and dtype unless ``dtype``)."""
    dev = resolve_device(device)
    cdt = DTYPES[info.options.compute_dtype]
    merged = set(merged_keys(base)) if info.step > 0 else set()
    keys = base.keys()
    bar = _bar(len(keys), "export", progress)

    def load(k: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return base.get(k), state.get(k) if k in merged and state is not None else None

    def compute(k: str, loaded: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        b, d = loaded
        if d is not None:
            t = torch.add(b.to(dev, cdt), d.to(dev, cdt), alpha=info.scale)
            return t.to(_out_dtype(b, dtype)).cpu()
        return b.to(_out_dtype(b, dtype)) if b.is_floating_point() else b

    def consume(k: str, t: torch.Tensor) -> None:
        out.add(k, t)
        bar.update()

    try:
        pipeline.run(
            keys, load, compute, consume, sizes=_sizes(base, keys), workers=default_workers(dev)
        )
        out.commit(output_metadata(info))
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()


__all__ = [
    "DTYPES",
    "SAFETENSORS_DTYPES",
    "check_compatible",
    "export",
    "fold",
    "merged_keys",
    "new_state",
    "resolve_device",
]
