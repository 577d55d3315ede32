"""Decide which tensors OPCM projects, and which are the vocabulary's: from config.json when possible."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch

from mergeflow.merging.projection import (
    EMBEDDING_TOKENS,
    ProjectionRule,
    by_module_types,
    by_name_rules,
    by_regex,
)
from mergeflow.merging.state import VocabInfo
from mergeflow.merging.tensors import TensorReader


def _meta_model(config: dict[str, Any]) -> tuple[Any, type]:
    """The config's architecture instantiated on the meta device, and its class (the last
    few kept: a state's projection and vocabulary both read it)."""
    return _meta_model_of(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=2)
def _meta_model_of(config_json: str) -> tuple[Any, type]:
    # transformers: only when a base has a config.json
    import transformers

    config = json.loads(config_json)
    cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in config.items() if k != "transformers_version"}
    )
    archs = config.get("architectures") or []
    cls: Any = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel._model_mapping[type(cfg)]
    with torch.device("meta"):
        model = cls._from_config(cfg)
    return model, cls


def linear_weight_names(config: dict[str, Any]) -> tuple[list[str], str]:
    """Instantiate the config's architecture on the meta device; return nn.Linear weight names and class."""
    model, cls = _meta_model(config)
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


_NOT_TOKENS = re.compile(r"pos|position|type|wpe", re.IGNORECASE)


def _vocab_modules(config: dict[str, Any]) -> tuple[list[str], list[str], bool]:
    """Input-embedding and output-head parameter names of the config's model, and whether they are tied."""
    model, _ = _meta_model(config)
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(inp, torch.nn.Embedding) or id(inp) not in names:
        return [], [], False  # no token embedding (e.g. a vision model's patch embedding)
    inputs = [f"{names[id(inp)]}.weight"]
    outputs = []
    tied = False
    if out is not None and id(out) in names:
        tied = out.weight is inp.weight
        outputs = [
            f"{names[id(out)]}.{p}" for p in ("weight", "bias") if getattr(out, p, None) is not None
        ]
    return inputs, outputs, tied


def resolve_vocab(base: TensorReader, config: dict[str, Any] | None) -> VocabInfo | None:
    """The vocabulary tensors (rows are tokens): the input embedding and the output head of the
    model an HF config instantiates, else by name (embedding markers but no position or type
    embeddings, and ``lm_head``/``embed_out``). An output head the base stores but the config
    ties to the input embedding is recorded as ``tied``: merged once, as the embedding."""
    metas = {k: base.meta(k) for k in base.keys()}
    inputs: list[str] = []
    outputs: list[str] = []
    tied = False
    found = None
    if config:
        try:
            found = _vocab_modules(config)
        except Exception:  # not instantiable (no transformers, a non-HF config): by name
            found = None
    if found is not None:
        inputs, outputs = _align(found[0], list(metas)), _align(found[1], list(metas))
        tied = found[2]
    else:
        for k, m in metas.items():
            parts = re.split(r"[._]", k)
            if not (m.is_float and len(m.shape) == 2 and k.endswith("weight")):
                continue
            if k.split(".")[0] in ("lm_head", "embed_out"):
                outputs.append(k)
            elif any(EMBEDDING_TOKENS.search(p) for p in parts) and not any(
                _NOT_TOKENS.search(p) for p in parts
            ):
                inputs.append(k)
    if not inputs or not metas[inputs[0]].is_float:
        return None
    rows = metas[inputs[0]].shape[0]
    hidden = tuple(k for k in outputs if tied and k.endswith("weight"))
    tensors = tuple(
        k
        for k in (*inputs, *outputs)
        if k not in hidden and metas[k].is_float and metas[k].shape[:1] == (rows,)
    )
    return VocabInfo(tensors=tensors, rows=rows, tied=hidden)
