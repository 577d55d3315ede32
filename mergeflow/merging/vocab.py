"""Readers that present vocabulary tensors with their rows in the merged vocabulary's order.

Which row is which token is decided elsewhere (``mergeflow.storage.vocab`` reads the
tokenizers); here a row map is plain integers: row ``r`` of the presented tensor is row
``src[r]`` of the wrapped one, or, where ``src[r] < 0``, a row the :class:`Fill` gives. Every
method then folds the presented tensors unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from mergeflow.merging.tensors import (
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    TensorMeta,
    TensorReader,
)

RowSource = Callable[[str, torch.Tensor], torch.Tensor]
"""``(key, merged row indices) -> those rows`` (the row axis first)."""


@dataclass(frozen=True)
class RowMap:
    """Where each presented row comes from, along ``axis``: ``src[r] >= 0`` a wrapped row."""

    src: torch.Tensor
    axis: int = 0

    @property
    def rows(self) -> int:
        return int(self.src.numel())

    def is_identity(self, rows: int) -> bool:
        """Whether the map presents a tensor of ``rows`` rows unchanged."""
        return rows == self.rows and bool(
            torch.equal(self.src, torch.arange(rows, dtype=self.src.dtype))
        )


def row_map(rows: int, keep: int, src: Mapping[int, int] | None = None, axis: int = 0) -> RowMap:
    """``rows`` rows: the first ``keep`` by index, then ``src`` overrides (-1: filled), the rest filled."""
    s = torch.full((rows,), -1, dtype=torch.int64)
    s[: min(keep, rows)] = torch.arange(min(keep, rows))
    for r, c in (src or {}).items():
        s[r] = c
    return RowMap(s, axis)


@dataclass(frozen=True)
class Fill:
    """Rows a map does not take from the wrapped tensor: ``rows(key, idx)``, or zeros when None.

    ``dtype``: the fill's safetensors dtype code per key (the presented tensor takes the
    promoted dtype, so filled values are exact); None: the wrapped tensor's.
    """

    rows: RowSource | None = None
    dtype: Callable[[str], str] | None = None


class RowsReader:
    """A :class:`~mergeflow.merging.tensors.TensorReader` over ``inner`` whose ``maps`` keys
    are presented in another row order (other keys unchanged, ``hide`` keys absent)."""

    def __init__(
        self,
        inner: TensorReader,
        maps: Mapping[str, RowMap],
        fill: Fill | None = None,
        hide: Collection[str] = (),
    ) -> None:
        self.inner = inner
        self.source = inner.source
        self.maps = dict(maps)
        self.fill = fill or Fill()
        self.hide = frozenset(hide)

    def keys(self) -> list[str]:
        return [k for k in self.inner.keys() if k not in self.hide]

    def _dtype(self, key: str, own: str) -> str:
        if self.fill.dtype is None or self.maps[key].src.min() >= 0:
            return own
        other = SAFETENSORS_DTYPES[self.fill.dtype(key)]
        return TORCH_TO_SAFETENSORS[torch.promote_types(SAFETENSORS_DTYPES[own], other)]

    def meta(self, key: str) -> TensorMeta:
        m = self.inner.meta(key)
        rm = self.maps.get(key)
        if rm is None:
            return m
        shape = list(m.shape)
        shape[rm.axis] = rm.rows
        return TensorMeta(self._dtype(key, m.dtype), tuple(shape))

    def get(self, key: str) -> torch.Tensor:
        t = self.inner.get(key)
        rm = self.maps.get(key)
        if rm is None:
            return t
        dtype = SAFETENSORS_DTYPES[self._dtype(key, TORCH_TO_SAFETENSORS[t.dtype])]
        x = t.movedim(rm.axis, 0)
        keep = rm.src >= 0
        if bool(keep.all()):
            out = x.index_select(0, rm.src).to(dtype)
        else:
            out = torch.empty((rm.rows, *x.shape[1:]), dtype=dtype)
            kept = keep.nonzero().squeeze(1)
            out[kept] = x.index_select(0, rm.src[kept]).to(dtype)
            filled = (~keep).nonzero().squeeze(1)
            if self.fill.rows is None:
                out[filled] = 0
            else:
                out[filled] = self.fill.rows(key, filled).to(dtype)
        return out.movedim(0, rm.axis).contiguous()
