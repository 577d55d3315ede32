"""Pool merges: a pool method (whole-model optimisation on calibration data) over checkpoint readers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import torch

from mergeflow.errors import CheckpointError, ConfigError, LearningError
from mergeflow.merging.batch import merge_metadata
from mergeflow.merging.export import _out_dtype
from mergeflow.merging.methods import get_pool, validate_params
from mergeflow.merging.methods.base import Objective, Pool
from mergeflow.merging.state import FoldOptions
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
    """Merge ``checkpoints`` with a pool method and write ``θ₀ + D`` with the base's names.

    Every checkpoint is checked from its headers first; task vectors are read on demand
    (NaN/Inf refused). Nothing is committed unless the whole merge succeeded; a diverging
    run raises :class:`~mergeflow.errors.CheckpointError` naming the pool.
    """
    pm = get_pool(method)
    p = validate_params(pm, params)
    opts = options or FoldOptions()
    if not checkpoints:
        raise ConfigError("no checkpoints to merge")
    for c in checkpoints:
        check_compatible(base, c, opts)
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
    try:
        try:
            delta = pm.merge(p, pool, objective, log or (lambda _m: None))
        except LearningError as e:
            raise CheckpointError(
                ", ".join(c.source for c in checkpoints[:3]), f"{e}; nothing was written"
            ) from None
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
