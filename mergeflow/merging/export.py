"""Exporting a state: the merged model ``θ₀ + s·D`` streamed out with the base's names."""

from __future__ import annotations

import json

import torch

from mergeflow.errors import ConfigError
from mergeflow.merging import pipeline
from mergeflow.merging.engine import DTYPES, _bar, _sizes, merged_keys, resolve_device
from mergeflow.merging.pipeline import default_workers
from mergeflow.merging.state import StateInfo
from mergeflow.merging.tensors import TensorReader, TensorWriter


def output_metadata(info: StateInfo) -> dict[str, str]:
    """safetensors metadata recorded in every exported model."""
    v = info.vocab
    vocab = (
        {
            "mergeflow.vocab": json.dumps(
                {
                    "policy": info.options.vocab,
                    "rows": v.merged_rows,
                    "added": len(v.added),
                    "left_out": sum(len(t) for t in v.left_out.values()),
                }
            )
        }
        if v is not None
        else {}
    )
    return vocab | {
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
