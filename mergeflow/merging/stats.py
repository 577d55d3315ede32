"""Statistics a checkpoint may carry for data-informed methods: the ``mergeflow.stats/1`` format.

A checkpoint may publish ``mergeflow_stats.safetensors`` beside its weights (in its folder,
S3 prefix or Hub repo). The file holds float32 tensors named after the checkpoint's own
tensors:

- ``<weight name>:gram``, shape ``[d_in, d_in]``: the mean over tokens of ``x xᵀ`` of the
  inputs ``x`` of the ``nn.Linear`` that owns ``<weight name>`` (shape ``[d_out, d_in]``),
  padding tokens excluded, so every checkpoint counts equally whatever its number of
  examples (RegMean, Jin et al. 2023, https://arxiv.org/abs/2212.09849);
- ``<param name>:fisher``, the parameter's shape: the diagonal Fisher information
  ``E_x[(∂ log p(y|x)/∂θ)²]``, averaged over examples (Fisher merging, Matena & Raffel 2022,
  https://arxiv.org/abs/2111.09832).

and safetensors metadata ``format: mergeflow.stats/1``, ``examples`` and ``tokens``
(decimal integers) and ``data`` (free text naming what the statistics were computed on).

:func:`check_stats` validates a file against the base from headers alone; the values are
checked for NaN/Inf as they are read (:meth:`CheckpointStats.get`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from mergeflow.errors import CheckpointError
from mergeflow.merging.tensors import TensorReader

STATS_FILE = "mergeflow_stats.safetensors"
STATS_FORMAT = "mergeflow.stats/1"
StatKind = Literal["gram", "fisher"]
STAT_KINDS: tuple[StatKind, ...] = get_args(StatKind)


def stats_key(name: str, kind: StatKind) -> str:
    """The stats-file name of one statistic: ``<tensor name>:<kind>``."""
    return f"{name}:{kind}"


def stats_metadata(examples: int, tokens: int, data: str) -> dict[str, str]:
    """The safetensors metadata of a stats file."""
    return {"format": STATS_FORMAT, "examples": str(examples), "tokens": str(tokens), "data": data}


def expected_shape(kind: StatKind, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of a statistic of a tensor of ``shape``; None when the kind does not apply."""
    if kind == "fisher":
        return shape
    return (shape[1], shape[1]) if len(shape) == 2 else None


@dataclass(frozen=True)
class CheckpointStats:
    """A validated stats file: which statistic exists for which base tensor, read lazily."""

    reader: TensorReader
    examples: int
    tokens: int
    data: str
    available: frozenset[tuple[str, StatKind]]

    @property
    def source(self) -> str:
        return self.reader.source

    def has(self, name: str, kind: StatKind) -> bool:
        return (name, kind) in self.available

    def names(self, kind: StatKind) -> list[str]:
        """Base tensor names that have a statistic of ``kind``."""
        return sorted(n for n, k in self.available if k == kind)

    def get(self, name: str, kind: StatKind) -> torch.Tensor:
        """One statistic; NaN/Inf or (for a Fisher or a Gram's diagonal) negative values are refused."""
        t = self.reader.get(stats_key(name, kind))
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                self.source, f"statistic {stats_key(name, kind)!r} contains NaN or Inf values"
            )
        neg = t if kind == "fisher" else torch.diagonal(t)
        if bool((neg < 0).any()):
            what = "a Fisher" if kind == "fisher" else "a Gram matrix's diagonal"
            raise CheckpointError(
                self.source,
                f"statistic {stats_key(name, kind)!r} has negative values, which {what} cannot have",
            )
        return t

    def iter(self, kind: StatKind) -> Iterator[tuple[str, torch.Tensor]]:
        """Every statistic of ``kind``, one at a time (a whole-model pass)."""
        for n in self.names(kind):
            yield n, self.get(n, kind)


def _count(metadata: Mapping[str, str], key: str, source: str) -> int:
    raw = metadata.get(key)
    try:
        value = int(raw) if raw is not None else -1
    except ValueError:
        value = -1
    if value < 1:
        raise CheckpointError(
            source, f"stats metadata {key!r} must be a positive integer, got {raw!r}"
        )
    return value


def check_stats(
    reader: TensorReader,
    metadata: Mapping[str, str] | None,
    base: TensorReader,
    checkpoint: TensorReader | None = None,
) -> CheckpointStats:
    """Validate a stats file against the base from its header: format, names, kinds, shapes.

    Refused, each with one message naming the statistic: an unknown or missing ``format``,
    missing counts, a name without a known ``:kind``, a statistic of a tensor the base
    lacks, a Gram of a tensor that is not 2-D, a wrong shape (typically a file made for
    another base) and a non-float dtype. Statistics of the ``checkpoint``'s own task head
    (its tensors the base lacks, which are never merged) are accepted and left unused.
    """
    src = reader.source
    meta = dict(metadata or {})
    fmt = meta.get("format")
    if fmt != STATS_FORMAT:
        raise CheckpointError(
            src, f"stats format {fmt!r} is not {STATS_FORMAT!r} (metadata key 'format')"
        )
    examples, tokens = _count(meta, "examples", src), _count(meta, "tokens", src)
    base_keys = set(base.keys())
    head_keys = set(checkpoint.keys()) - base_keys if checkpoint is not None else set()
    available: set[tuple[str, StatKind]] = set()
    for key in reader.keys():
        name, _, kind = key.rpartition(":")
        if not name or kind not in STAT_KINDS:
            raise CheckpointError(
                src, f"stats tensor {key!r} is not named '<tensor>:gram' or '<tensor>:fisher'"
            )
        if name in head_keys:
            continue
        if name not in base_keys:
            raise CheckpointError(
                src, f"stats tensor {key!r} is for {name!r}, which the base does not have"
            )
        meta_t, bshape = reader.meta(key), base.meta(name).shape
        want = expected_shape(kind, bshape)
        if want is None:
            raise CheckpointError(
                src,
                f"stats tensor {key!r}: a Gram needs a 2-D (nn.Linear) weight, but {name!r} has shape {list(bshape)}",
            )
        if meta_t.shape != want:
            raise CheckpointError(
                src,
                f"stats tensor {key!r} has shape {list(meta_t.shape)} but the base's {name!r} "
                f"{list(bshape)} needs {list(want)}; was it made for another base?",
            )
        if not meta_t.is_float:
            raise CheckpointError(
                src, f"stats tensor {key!r} has dtype {meta_t.dtype}; statistics are floats"
            )
        available.add((name, kind))
    if not available:
        raise CheckpointError(src, "the stats file holds no statistics")
    return CheckpointStats(reader, examples, tokens, meta.get("data", ""), frozenset(available))
