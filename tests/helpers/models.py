"""Tiny synthetic models, fake fine-tunes and an in-memory fold for the merging tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def tiny_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small model: non-square linears with biases, an embedding, a norm and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "embed.weight": torch.randn(20, 8, generator=g),
        "layers.0.fc.weight": torch.randn(12, 8, generator=g),
        "layers.0.fc.bias": torch.randn(12, generator=g),
        "layers.0.out.weight": torch.randn(8, 12, generator=g),
        "layers.0.norm.weight": torch.ones(8),
        "layers.1.fc.weight": torch.randn(12, 8, generator=g),
        "layers.1.out.weight": torch.randn(8, 12, generator=g),
        "position_ids": torch.arange(6),
    }
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()}


def finetune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A fake fine-tune: base + a low-rank-plus-noise task vector on every float tensor."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        d = torch.randn(v.shape, generator=g) * scale
        if v.dim() == 2:
            u = torch.randn(v.shape[0], 1, generator=g)
            w = torch.randn(1, v.shape[1], generator=g)
            d = d + scale * 3 * (u @ w) / (v.shape[0] * v.shape[1]) ** 0.25
        out[k] = (v.float() + d).to(v.dtype)
    return out


def fold_in_memory(
    method: str,
    base: dict[str, torch.Tensor],
    ckpts: Iterable[dict[str, torch.Tensor]],
    params: dict[str, Any] | None = None,
    options: Any = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Fold ``ckpts`` into ``base`` with the engine over in-memory readers; returns (merged, info)."""
    from mergeflow.merging import engine, export
    from mergeflow.merging.projection import by_name_rules
    from mergeflow.merging.state import BaseRef
    from mergeflow.merging.tensors import DictReader, DictWriter

    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state(method, params or {}, BaseRef(uri="base", digest="d"), rule, options)
    state = None
    for i, c in enumerate(ckpts):
        w = DictWriter()
        info = engine.fold(
            info, state, br, DictReader(c, f"c{i}"), checkpoint_id=f"c{i}", digest=f"d{i}", out=w
        )
        state = w.reader()
    out = DictWriter()
    export.export(info, state, br, out, dtype=dtype)
    return out.tensors, info


def tiny_bert() -> torch.nn.Module:
    """A 2-layer BertModel of width 16 (seeded), for adapter and format tests."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg)
