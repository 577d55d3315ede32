"""One-shot (batch) merges through the same streaming pipeline as the fold engine."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from mergeflow.errors import ConfigError
from mergeflow.merging import engine, pipeline
from mergeflow.merging.engine import (
    DTYPES,
    _bar,
    _finite,
    _sizes,
    _task_vector,
    check_compatible,
    merged_keys,
    resolve_device,
)
from mergeflow.merging.export import _out_dtype
from mergeflow.merging.methods import get_batch, validate_params
from mergeflow.merging.methods.base import MethodParams
from mergeflow.merging.pipeline import default_workers
from mergeflow.merging.state import FoldOptions
from mergeflow.merging.tensors import TensorReader, TensorWriter

HALF = (torch.bfloat16, torch.float16)


def merge_metadata(
    method: str, params: MethodParams, checkpoints: Sequence[TensorReader]
) -> dict[str, str]:
    """safetensors metadata of a one-shot (batch or pool) merge's output."""
    return {
        "mergeflow.method": method,
        "mergeflow.params": json.dumps(params.model_dump(), sort_keys=True),
        "mergeflow.checkpoints": json.dumps([c.source for c in checkpoints]),
    }


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

    linear = bm.linear_scale(p, len(checkpoints))

    def summed(k: str, b: torch.Tensor, raws: list[torch.Tensor | None]) -> torch.Tensor | None:
        """``θ₀ + s·(Σ θ_i − n·θ₀)`` for a linear method on 16-bit inputs, block by block.

        Each 16-bit value is exact in the (wider) compute dtype, so only the running sums
        round, by about ``ε·Σ|θ_i|``: far below the 16-bit output's rounding. On a CPU the
        sums run over blocks of ``engine.BLOCK`` elements that stay in the core's cache, so
        each input is read from memory once. None (the general path) for other inputs,
        and where a block's sum is not finite: that path then names the input at fault,
        or merges what only overflowed here.
        """
        if (
            linear is None
            or cdt.itemsize < 4
            or b.dtype not in HALF
            or any(r is None or r.dtype not in HALF for r in raws)
        ):
            return None
        flat = [r.to(dev).reshape(-1) for r in raws if r is not None]
        bflat = b.to(dev).reshape(-1)
        n = bflat.numel()
        step = max(1, min(n, engine.BLOCK if dev.type == "cpu" else n))
        out = torch.empty(n, dtype=_out_dtype(b, dtype), device=dev)
        acc = torch.empty(step, dtype=cdt, device=dev)
        tmp = torch.empty_like(acc)
        sums = torch.empty(-(-n // step), dtype=cdt, device=dev)
        for i, a in enumerate(range(0, n, step)):
            e = min(a + step, n)
            ac, tp = acc[: e - a], tmp[: e - a]
            ac.copy_(flat[0][a:e])
            for r in flat[1:]:
                ac.add_(tp.copy_(r[a:e]))
            ac.sub_(tp.copy_(bflat[a:e]), alpha=len(flat))
            sums[i] = ac.sum()
            out[a:e].copy_(torch.add(tp, ac, alpha=linear, out=ac))
        if not bool(torch.isfinite(sums).all()):
            return None
        return out.reshape(b.shape).cpu()

    def compute(k: str, loaded: tuple[torch.Tensor, list[torch.Tensor | None]]) -> torch.Tensor:
        b, raws = loaded
        if k not in merged:
            return b
        fast = summed(k, b, raws)
        if fast is not None:
            return fast
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
        meta = merge_metadata(method, p, checkpoints)
        out.commit(meta)
        return meta
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
