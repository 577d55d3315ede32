"""Planning a fold: validate it from headers and statistics, then run the method's whole-model step."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from mergeflow.errors import CheckpointError, ConfigError, LearningError, StateError
from mergeflow.merging.methods import get_continual, validate_params
from mergeflow.merging.methods.base import (
    ContinualMethod,
    MethodParams,
    MethodScalars,
    Objective,
    Prepared,
    WholeModel,
)
from mergeflow.merging.state import StateInfo
from mergeflow.merging.stats import STATS_FILE, CheckpointStats, stats_key
from mergeflow.merging.tensors import TensorReader
from mergeflow.merging.vectors import (
    DTYPES,
    _task_vector,
    check_compatible,
    merged_keys,
    resolve_device,
)


@dataclass(frozen=True)
class FoldPlan:
    """A validated fold of one checkpoint: what :func:`fold_tensors` and :func:`finish_fold` need.

    ``prepared`` holds the method's whole-model step results (floats or small tensors) and
    ``with_stats`` the tensors whose statistics the method reads, so a plan can be shipped
    to other workers that fold disjoint groups of ``keys``.
    """

    checkpoint_id: str
    digest: str
    step: int
    keys: tuple[str, ...]
    heads: tuple[str, ...]
    prepared: Prepared
    with_stats: frozenset[str] = frozenset()


def _finite(v: float | torch.Tensor) -> bool:
    """Whether a whole-model step's value is finite (every entry, for a tensor)."""
    return bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v)


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


def needs_statistics(info: StateInfo) -> bool:
    """Whether the state's method reads each checkpoint's statistics."""
    return bool(_continual(info)[0].statistics)


def needs_objective(info: StateInfo) -> bool:
    """Whether the state's method learns from calibration data at every fold."""
    return _continual(info)[0].needs_objective


def slot_key(key: str, slot: str) -> str:
    """The state-file name of an extra state tensor: ``<tensor name>:<slot>``."""
    return f"{key}:{slot}"


def _stats_plan(
    cm: ContinualMethod[Any, Any],
    info: StateInfo,
    state: TensorReader | None,
    stats: CheckpointStats | None,
    keys: Sequence[str],
    source: str,
) -> frozenset[str]:
    """The tensors whose statistics a fold reads; refuses a checkpoint that lacks what the method needs.

    At step 1 every merged tensor with each needed statistic gets them; later, exactly the
    tensors the state keeps extra slots for, so a statistic the earlier folds had must be
    present and one they lacked is refused (the state could not combine it).
    """
    if not cm.statistics:
        return frozenset()
    kinds = sorted(cm.statistics)
    if stats is None:
        raise CheckpointError(
            source,
            f"method {info.method!r} needs statistics ({', '.join(kinds)}) but the checkpoint "
            f"carries no {STATS_FILE}; compute one with `mergeflow stats` (a lineage computes it "
            "from the task's calibration split)",
        )
    have = {k for k in keys if all(stats.has(k, kind) for kind in kinds)}
    if state is None:
        if not have:
            raise CheckpointError(
                stats.source,
                f"the stats file has no tensor with every statistic method {info.method!r} "
                f"needs ({', '.join(kinds)})",
            )
        return frozenset(have)
    state_keys = set(state.keys())
    kept = {k for k in keys if any(slot_key(k, sl) in state_keys for sl in cm.slots)}
    for k in sorted(kept - have):
        lacking = [kind for kind in kinds if not stats.has(k, kind)]
        raise CheckpointError(
            stats.source,
            f"statistic {stats_key(k, lacking[0])!r} is missing, but the earlier folds had it",
        )
    for k in sorted(have - kept):
        raise CheckpointError(
            stats.source,
            f"statistic {stats_key(k, kinds[0])!r} has no counterpart in the state: the earlier "
            "folds had none for this tensor, so it cannot be combined with them",
        )
    return frozenset(kept)


def plan_fold(
    info: StateInfo,
    base: TensorReader,
    checkpoint: TensorReader,
    *,
    checkpoint_id: str,
    digest: str,
    device: str | None = "cpu",
    state: TensorReader | None = None,
    stats: CheckpointStats | None = None,
    objective: Objective | None = None,
) -> FoldPlan:
    """Validate a fold from headers (duplicates, names, shapes, dtypes, statistics) and run the
    method's whole-model step (``state``: the previous state's tensors, read by that step)."""
    cm, params = _continual(info)
    _scalars(cm, info)  # a state that does not fit its method fails before the pass
    done = info.folded(checkpoint_id, digest)
    if done is not None:
        raise StateError(
            f"checkpoint {checkpoint_id} (digest {digest}) is already folded as step {done.step} ({done.id})"
        )
    heads = check_compatible(base, checkpoint, info.options)
    if cm.needs_objective and objective is None:
        raise ConfigError(
            f"method {info.method!r} learns from calibration data, and none was given "
            "(a lineage reads its tasks' calibration split; the CLI takes --calibration)"
        )
    keys = merged_keys(base)
    with_stats = _stats_plan(
        cm, info, state if info.step > 0 else None, stats, keys, checkpoint.source
    )
    dev, cdt = resolve_device(device), DTYPES[info.options.compute_dtype]
    present = set(checkpoint.keys())

    def taus() -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            b = base.get(k).to(dev, cdt)
            raw = checkpoint.get(k) if k in present else None
            yield k, _task_vector(checkpoint.source, raw, k, b, cdt)

    def bases() -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            yield k, base.get(k).to(dev, cdt)

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        assert state is not None
        for k in keys:
            yield k, state.get(k).to(dev, cdt) * info.scale

    whole = WholeModel(
        step=info.step + 1,
        taus=taus,
        base=bases,
        merged=merged if info.step > 0 and state is not None else None,
        stats=stats,
        objective=objective,
        projected=frozenset(info.projection.projected),
    )
    try:
        prepared = cm.prepare(params, whole) or {}
    except (LearningError, ConfigError) as e:  # diverged, or calibration data that does not fit
        raise CheckpointError(checkpoint.source, f"{e}; nothing was folded") from None
    bad = [k for k, v in prepared.items() if not _finite(v)]
    if bad:
        raise CheckpointError(
            checkpoint.source,
            f"method {info.method!r}'s whole-model step gave a non-finite {bad[0]!r}; nothing was folded",
        )
    return FoldPlan(
        checkpoint_id,
        digest,
        info.step + 1,
        tuple(keys),
        tuple(heads),
        prepared,
        with_stats,
    )
