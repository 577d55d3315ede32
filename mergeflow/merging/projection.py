"""Which tensors OPCM projects, and how that choice is recorded.

OPCM projects the 2-D weights of linear layers. The rule is resolved once, when a
state is created, into an explicit list of tensor names stored with the state, so
every later fold and every export states exactly what was projected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mergeflow.errors import ConfigError
from mergeflow.merging.tensors import TensorMeta

EMBEDDING_TOKENS = re.compile(r"embed|^emb$|^wte$|^wpe$|^shared$", re.IGNORECASE)
NAME_RULE = (
    "name rules: 2-D floating-point tensors named '*weight' whose dotted/underscored name "
    "parts contain no embedding marker (embed*, emb, wte, wpe, shared)"
)


class ProjectionRule(BaseModel):
    """The resolved projection rule: how it was decided and the projected tensor names."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["module-types", "name-rules", "regex"]
    description: str
    projected: tuple[str, ...]

    def is_projected(self, key: str) -> bool:
        return key in self.projected_set

    @cached_property
    def projected_set(self) -> frozenset[str]:
        return frozenset(self.projected)


def _is_matrix(meta: TensorMeta) -> bool:
    return meta.is_float and len(meta.shape) == 2


def by_name_rules(metas: Mapping[str, TensorMeta]) -> ProjectionRule:
    """Project 2-D float ``*weight`` tensors that are not embeddings (no config available)."""
    keys = []
    for k, m in metas.items():
        parts = re.split(r"[._]", k)
        if (
            _is_matrix(m)
            and k.endswith("weight")
            and not any(EMBEDDING_TOKENS.search(p) for p in parts)
        ):
            keys.append(k)
    return ProjectionRule(kind="name-rules", description=NAME_RULE, projected=tuple(keys))


def by_regex(metas: Mapping[str, TensorMeta], pattern: str) -> ProjectionRule:
    """Project the 2-D float tensors whose name matches ``pattern`` (``re.search``)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"projection regex {pattern!r} is invalid: {e}") from None
    keys = tuple(k for k, m in metas.items() if _is_matrix(m) and rx.search(k))
    return ProjectionRule(
        kind="regex",
        description=f"regex override: 2-D float tensors matching {pattern!r}",
        projected=keys,
    )


def by_module_types(
    metas: Mapping[str, TensorMeta], linear_weights: Iterable[str], model_class: str
) -> ProjectionRule:
    """Project the weights that belong to linear modules found by instantiating the model."""
    wanted = set(linear_weights)
    keys = tuple(k for k, m in metas.items() if k in wanted and _is_matrix(m))
    return ProjectionRule(
        kind="module-types",
        description=f"module types: weights of torch.nn.Linear modules of {model_class} (instantiated on the meta device from config.json)",
        projected=keys,
    )
