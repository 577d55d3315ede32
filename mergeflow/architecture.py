"""Decide which tensors OPCM projects: module types from config.json when possible."""

from __future__ import annotations

from typing import Any

import torch

from mergeflow.merging.projection import ProjectionRule, by_module_types, by_name_rules, by_regex
from mergeflow.merging.tensors import TensorReader


def linear_weight_names(config: dict[str, Any]) -> tuple[list[str], str]:
    """Instantiate the config's architecture on the meta device; return nn.Linear weight names and class."""
    # transformers: only when a base has a config.json
    import transformers

    cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in config.items() if k != "transformers_version"}
    )
    archs = config.get("architectures") or []
    cls: Any = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel._model_mapping[type(cfg)]
    with torch.device("meta"):
        model = cls._from_config(cfg)
    names = [
        f"{n}.weight" if n else "weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return names, cls.__name__


def _align(names: list[str], keys: list[str]) -> list[str]:
    """Map module-derived names onto stored tensor names (prefixes like ``vit.`` may differ)."""
    keyset = set(keys)
    out = []
    for n in names:
        if n in keyset:
            out.append(n)
            continue
        hits = [k for k in keys if k.endswith("." + n) or n.endswith("." + k)]
        if len(hits) == 1:
            out.append(hits[0])
    return out


def resolve_projection(
    base: TensorReader, config: dict[str, Any] | None, regex: str | None = None
) -> ProjectionRule:
    """Regex override > module types from an HF config > name rules (the rule is recorded)."""
    metas = {k: base.meta(k) for k in base.keys()}
    if regex:
        return by_regex(metas, regex)
    if config:
        try:
            names, cls = linear_weight_names(config)
        except Exception as e:
            rule = by_name_rules(metas)
            return rule.model_copy(
                update={
                    "description": f"{rule.description} (config.json could not be instantiated: {type(e).__name__})"
                }
            )
        return by_module_types(metas, _align(names, list(metas)), cls)
    return by_name_rules(metas)
