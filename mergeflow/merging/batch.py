"""One-shot (batch) merges through the same streaming pipeline as the fold engine."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from mergeflow.errors import ConfigError
from mergeflow.merging import pipeline
from mergeflow.merging.engine import (
    DTYPES,
    _bar,
    _finite,
    _out_dtype,
    _sizes,
    _task_vector,
    check_compatible,
    merged_keys,
    resolve_device,
)
from mergeflow.merging.methods import get_batch, validate_params
from mergeflow.merging.pipeline import default_workers
from mergeflow.merging.state import FoldOptions
from mergeflow.merging.tensors import TensorReader, TensorWriter


def batch_merge(
    method: str,
    params: Mapping[str, object],
    base: TensorReader,
    checkpoints: Sequence[TensorReader],
    out: TensorWriter,
    *,
    options: FoldOptions | None = None,
    dtype: str | None = None,
    device: str | None = "cpu",
    progress: bool = False,
) -> dict[str, str]:
    """One-shot merge of all checkpoints with a batch method, one tensor (of each input) at a time."""
    bm = get_batch(method)
    p = validate_params(bm, params)
    opts = options or FoldOptions()
    if not checkpoints:
        raise ConfigError("no checkpoints to merge")
    for c in checkpoints:
        check_compatible(base, c, opts)
    dev = resolve_device(device)
    cdt = DTYPES[opts.compute_dtype]
    merged = set(merged_keys(base))
    presents = [set(c.keys()) for c in checkpoints]
    keys = base.keys()
    bar = _bar(len(keys), f"merge {method}", progress)

    def load(k: str) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        if k not in merged:
            return base.get(k), []
        return base.get(k), [
            c.get(k) if k in p_ else None for c, p_ in zip(checkpoints, presents, strict=True)
        ]

    def compute(k: str, loaded: tuple[torch.Tensor, list[torch.Tensor | None]]) -> torch.Tensor:
        b, raws = loaded
        if k not in merged:
            return b
        bc = b.to(dev, cdt)
        if not bool(torch.isfinite(bc.sum())):
            _finite(bc, base.source, k)
        taus = [
            _task_vector(c.source, raw, k, bc, cdt)
            for c, raw in zip(checkpoints, raws, strict=True)
        ]
        del raws
        d, scale = bm.merge_tensor(p, k, taus)  # taus are fresh: the method may reuse them
        del taus
        if d.dtype == bc.dtype and d.shape == bc.shape and d.data_ptr() != bc.data_ptr():
            merged_t = torch.add(bc, d, alpha=scale, out=d)  # the same op, without a new tensor
        else:
            merged_t = torch.add(bc, d, alpha=scale)
        return merged_t.to(_out_dtype(b, dtype)).cpu()

    def consume(k: str, t: torch.Tensor) -> None:
        out.add(k, t)
        bar.update()

    try:
        sizes = {k: n * (len(checkpoints) + 1) for k, n in _sizes(base, keys).items()}
        pipeline.run(keys, load, compute, consume, sizes=sizes, workers=default_workers(dev))
        meta = {
            "mergeflow.method": method,
            "mergeflow.params": json.dumps(p.model_dump(), sort_keys=True),
            "mergeflow.checkpoints": json.dumps([c.source for c in checkpoints]),
        }
        out.commit(meta)
        return meta
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
