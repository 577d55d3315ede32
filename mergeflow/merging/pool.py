"""Pool merges: a pool method (whole-model optimisation on calibration data) over checkpoint readers.

:func:`pool_merge` writes the merged model (``mergeflow merge``); a lineage keeps
:func:`pool_delta`'s result as a *pool state* (:func:`pool_info`): ``D = θ̄ − θ₀`` with scale
1 and the pool's checkpoints, so its export, evaluation and registration are a fold's, and
the next checkpoint is merged with the same pool again (see ``storage/pools.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import torch

from mergeflow.errors import CheckpointError, ConfigError, LearningError
from mergeflow.merging.batch import merge_metadata
from mergeflow.merging.export import _out_dtype
from mergeflow.merging.methods import get_pool, validate_params
from mergeflow.merging.methods.base import MethodParams, Objective, Pool
from mergeflow.merging.state import FoldedCheckpoint, FoldOptions, StateInfo
from mergeflow.merging.tensors import TensorReader, TensorWriter
from mergeflow.merging.vectors import (
    DTYPES,
    _task_vector,
    check_compatible,
    merged_keys,
    resolve_device,
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pool_delta(
    method: str,
    params: Mapping[str, object],
    base: TensorReader,
    checkpoints: Sequence[TensorReader],
    objective: Objective,
    *,
    options: FoldOptions | None = None,
    device: str | None = "cpu",
    log: Callable[[str], None] | None = _stderr,
    names: Sequence[str] = (),
) -> tuple[MethodParams, dict[str, torch.Tensor], list[tuple[str, ...]]]:
    """Run a pool method: its validated parameters, ``θ̄ − θ₀`` of every merged tensor (finite,
    on ``device``) and each checkpoint's heads (its tensors the base lacks).

    Every checkpoint is checked from its headers first; task vectors are read on demand
    (NaN/Inf refused). A diverging run raises :class:`~mergeflow.errors.CheckpointError`
    naming the pool.
    """
    pm = get_pool(method)
    p = validate_params(pm, params)
    opts = options or FoldOptions()
    if not checkpoints:
        raise ConfigError("no checkpoints to merge")
    heads = [tuple(check_compatible(base, c, opts)) for c in checkpoints]
    dev, cdt = resolve_device(device), DTYPES[opts.compute_dtype]
    keys = tuple(merged_keys(base))
    presents = [set(c.keys()) for c in checkpoints]

    def base_of(k: str) -> torch.Tensor:
        return base.get(k).to(dev, cdt)

    def tau(i: int, k: str) -> torch.Tensor:
        c = checkpoints[i]
        raw = c.get(k) if k in presents[i] else None
        return _task_vector(c.source, raw, k, base_of(k), cdt)

    pool = Pool(keys, len(checkpoints), base_of, tau, tuple(names))
    label = ", ".join(c.source for c in checkpoints[:3]) + (", ..." if len(checkpoints) > 3 else "")
    try:
        delta = pm.merge(p, pool, objective, log or (lambda _m: None))
    except LearningError as e:
        raise CheckpointError(label, f"{e}; nothing was written") from None
    for k in keys:
        if not bool(torch.isfinite(delta[k]).all()):
            raise CheckpointError(label, f"the {method} merge gave NaN or Inf in tensor {k!r}")
    return p, delta, heads


def pool_merge(
    method: str,
    params: Mapping[str, object],
    base: TensorReader,
    checkpoints: Sequence[TensorReader],
    out: TensorWriter,
    objective: Objective,
    *,
    options: FoldOptions | None = None,
    dtype: str | None = None,
    device: str | None = "cpu",
    log: Callable[[str], None] | None = _stderr,
    names: Sequence[str] = (),
) -> dict[str, str]:
    """Merge ``checkpoints`` with a pool method (:func:`pool_delta`) and write ``θ₀ + D`` with
    the base's names. Nothing is committed unless the whole merge succeeded."""
    opts = options or FoldOptions()
    try:
        p, delta, _ = pool_delta(
            method,
            params,
            base,
            checkpoints,
            objective,
            options=opts,
            device=device,
            log=log,
            names=names,
        )
        dev, cdt = resolve_device(device), DTYPES[opts.compute_dtype]
        for k in base.keys():
            b = base.get(k)
            if k in delta:
                t = (b.to(dev, cdt) + delta[k].to(dev, cdt)).to(_out_dtype(b, dtype)).cpu()
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(base.source, f"merging tensor {k!r} gave NaN or Inf")
                out.add(k, t)
            else:
                out.add(k, b.to(_out_dtype(b, dtype)) if b.is_floating_point() else b)
        meta = merge_metadata(method, p, checkpoints)
        out.commit(meta)
        return meta
    except BaseException:
        out.abort()
        raise


def pool_info(
    start: StateInfo,
    params: MethodParams,
    checkpoints: Sequence[FoldedCheckpoint],
    heads: Mapping[str, tuple[str, ...]],
    left_out: Mapping[str, tuple[str, ...]],
) -> StateInfo:
    """The state of a pool merge: ``D = θ̄ − θ₀`` with scale 1 over ``checkpoints`` (in pool
    order, with their URIs, so the pool can be merged again with another checkpoint), with
    ``start``'s method, options, projection rule, base and vocabulary; ``heads``: checkpoint id
    -> its tensors the base lacks; ``left_out``: the tokens each one added, left out."""
    vocab = start.vocab
    if vocab is not None:
        vocab = vocab.model_copy(
            update={"left_out": {k: tuple(v) for k, v in left_out.items() if v}}
        )
    return start.model_copy(
        update={
            "params": params.model_dump(),
            "step": len(checkpoints),
            "scale": 1.0,
            "scalars": {},
            "checkpoints": tuple(checkpoints),
            "heads": {k: tuple(v) for k, v in heads.items() if v},
            "vocab": vocab,
        }
    )
