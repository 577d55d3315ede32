"""The streaming fold engine.

Every pass walks the base's tensor names once and holds one tensor of each input
at a time, so memory depends on the largest tensor, not on the model size or the
number of folded checkpoints. IO happens only through the reader/writer protocols
of :mod:`mergeflow.merging.tensors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NoReturn

import torch

from mergeflow.errors import CheckpointError, StateError
from mergeflow.merging import pipeline
from mergeflow.merging.methods import get_continual, get_pool, method_names, validate_params
from mergeflow.merging.methods.base import (
    Folded,
    FoldStats,
    Objective,
    TensorStep,
)
from mergeflow.merging.pipeline import default_workers
from mergeflow.merging.plan import (
    FoldPlan,
    _continual,
    _scalars,
    needs_objective,
    needs_statistics,
    plan_fold,
    slot_key,
)
from mergeflow.merging.projection import ProjectionRule
from mergeflow.merging.state import BaseRef, FoldedCheckpoint, FoldOptions, StateInfo, VocabInfo
from mergeflow.merging.stats import CheckpointStats
from mergeflow.merging.tensors import SAFETENSORS_DTYPES, TensorReader, TensorWriter
from mergeflow.merging.vectors import (
    BLOCK,
    DTYPES,
    FoldSums,
    _bar,
    _finite,
    _fold_in_blocks,
    _sizes,
    _task_vector,
    check_compatible,
    check_task_vector_ratio,
    merged_keys,
    resolve_device,
    screen_task_vector_ratio,
    task_vector_ratio,
)


def new_state(
    method: str,
    params: Mapping[str, object],
    base: BaseRef,
    projection: ProjectionRule,
    options: FoldOptions | None = None,
    vocab: VocabInfo | None = None,
) -> StateInfo:
    """An empty (step 0) state for a continual method, or a pool method for a lineage that
    merges pools; parameters are validated here.

    ``vocab``: the base's vocabulary tensors (their rows are aligned by token when folding)."""
    kind = get_pool if method in method_names("pool") else get_continual
    p = validate_params(kind(method), params)
    return StateInfo(
        method=method,
        params=p.model_dump(),
        base=base,
        projection=projection,
        options=options or FoldOptions(),
        vocab=vocab,
    )


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
    stats: CheckpointStats | None = None,
) -> FoldSums:
    """Fold ``keys`` (default: all of the plan's) into ``out`` without committing it.

    Returns the partial sums over those tensors, for :func:`finish_fold`; ``base_norm`` adds
    ``‖θ₀‖²`` (from the base tensors the fold reads anyway) for the task-vector ratio.
    ``stats``: the checkpoint's statistics (needed when ``plan.with_stats`` is not empty).
    Extra state tensors of the method are read as ``<name>:<slot>`` and written likewise.
    """
    cm, params = _continual(info)
    if (info.step > 0) != (state is not None):
        raise StateError("a state at step > 0 needs its tensors, and a step-0 state has none")
    if plan.with_stats and stats is None:
        raise StateError("this fold reads the checkpoint's statistics, and none were given")
    dev, cdt = resolve_device(device), DTYPES[info.options.compute_dtype]
    present = set(checkpoint.keys())
    state_keys = set(state.keys()) if state is not None else set()
    todo = list(plan.keys if keys is None else keys)
    sums = [0.0, 0.0, 0.0]
    bar = _bar(len(todo), f"fold {plan.checkpoint_id}", progress)

    Loaded = tuple[
        torch.Tensor,
        torch.Tensor | None,
        torch.Tensor | None,
        dict[str, torch.Tensor],
        dict[str, torch.Tensor],
    ]

    def load(k: str) -> Loaded:
        c = checkpoint.get(k) if k in present else None
        extra = {
            sl: state.get(slot_key(k, sl))
            for sl in cm.slots
            if state is not None and slot_key(k, sl) in state_keys
        }
        st: dict[str, torch.Tensor] = (
            {str(kind): stats.get(k, kind) for kind in cm.statistics}
            if stats is not None and k in plan.with_stats
            else {}
        )
        return base.get(k), c, state.get(k) if state is not None else None, st, extra

    def refuse(k: str, b: torch.Tensor, c: torch.Tensor | None) -> NoReturn:
        """‖τ‖² was not finite: name the input with NaN/Inf, else the overflow."""
        _finite(b, base.source, k)
        _finite(c if c is not None else b, checkpoint.source, k)
        raise CheckpointError(checkpoint.source, f"tensor {k!r} overflows against the base")

    def compute(
        k: str, loaded: Loaded
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float, float, float]:
        raw_b, raw_c, raw_prev, st, extra = loaded
        projected = info.projection.is_projected(k)
        if dev.type == "cpu" and not st and not extra and cm.elementwise(params, projected):
            new, sq_new, sq_tau, sq_base = _fold_in_blocks(
                lambda prev, tau: _state_only(
                    cm.fold_tensor(
                        params, TensorStep(k, plan.step, prev, tau, projected, plan.prepared)
                    ),
                    info.method,
                ),
                raw_b,
                raw_c,
                raw_prev,
                cdt,
                base_norm,
            )
            if not math.isfinite(sq_tau):
                refuse(k, raw_b, raw_c)
            return new, {}, sq_new, sq_tau, sq_base
        b = raw_b.to(dev).to(cdt)  # upcast (bf16 -> compute dtype) on the device
        sq_base = float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2 if base_norm else 0.0
        tau = _task_vector(checkpoint.source, raw_c, k, b, cdt, check=False)
        sq_tau = float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
        if not math.isfinite(sq_tau):  # one pass finds NaN/Inf in either input; then say which
            refuse(k, b, raw_c)
        prev = raw_prev.to(dev).to(cdt) if raw_prev is not None else None
        result = cm.fold_tensor(
            params,
            TensorStep(
                k,
                plan.step,
                prev,
                tau,
                projected,
                plan.prepared,
                stats={kind: t.to(dev, cdt) for kind, t in st.items()},
                extra={sl: t.to(dev, cdt) for sl, t in extra.items()},
            ),
        )
        new, new_extra = (
            (result.state, result.extra) if isinstance(result, Folded) else (result, {})
        )
        unknown = set(new_extra) - set(cm.slots)
        if unknown:
            raise StateError(f"method {info.method!r} returned undeclared slots {sorted(unknown)}")
        new = new.to(cdt)
        sq_new = float(torch.linalg.vector_norm(new, dtype=torch.float64)) ** 2
        if not math.isfinite(sq_new):
            raise CheckpointError(
                checkpoint.source, f"folding tensor {k!r} gave NaN or Inf; nothing was written"
            )
        return (
            new.cpu(),
            {sl: t.to(cdt).cpu() for sl, t in new_extra.items()},
            sq_new,
            sq_tau,
            sq_base,
        )

    def consume(
        k: str, result: tuple[torch.Tensor, dict[str, torch.Tensor], float, float, float]
    ) -> None:
        tensor, extra, *squares = result
        out.add(k, tensor)
        for sl, t in extra.items():
            out.add(slot_key(k, sl), t)
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


def _state_only(result: torch.Tensor | Folded, method: str) -> torch.Tensor:
    """An elementwise step's ``D``; an elementwise method keeps no extra slots."""
    if isinstance(result, Folded):
        raise StateError(f"method {method!r} is elementwise but returned extra state tensors")
    return result


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
    stats: CheckpointStats | None = None,
    objective: Objective | None = None,
) -> StateInfo:
    """Fold one checkpoint into a state, streaming; returns the new state's JSON half.

    ``stats``: the checkpoint's statistics (:mod:`mergeflow.merging.stats`), for methods
    that read them; ``objective``: calibration loss, for methods that learn.

    Writes the new state tensors to ``out`` and the checkpoint's tensors that the base
    lacks (task heads) to ``heads_out``; commits both only when the whole pass
    succeeded and aborts both otherwise. The input state is never modified.
    ``max_task_vector_ratio`` refuses a checkpoint from another base before anything is
    committed, from norms summed during the same pass (no extra read).
    """
    writers = [w for w in (out, heads_out) if w is not None]
    try:
        plan = plan_fold(
            info,
            base,
            checkpoint,
            checkpoint_id=checkpoint_id,
            digest=digest,
            device=device,
            state=state,
            stats=stats,
            objective=objective,
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
            stats=stats,
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


__all__ = [
    "FoldPlan",
    "needs_objective",
    "needs_statistics",
    "plan_fold",
    "slot_key",
    "BLOCK",
    "FoldSums",
    "_bar",
    "_finite",
    "_sizes",
    "_task_vector",
    "check_task_vector_ratio",
    "screen_task_vector_ratio",
    "task_vector_ratio",
    "DTYPES",
    "SAFETENSORS_DTYPES",
    "check_compatible",
    "fold",
    "merged_keys",
    "new_state",
    "resolve_device",
]
