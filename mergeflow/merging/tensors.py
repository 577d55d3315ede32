"""Reader and writer protocols the fold engine streams through, plus in-memory versions.

The engine never sees files, S3 or the Hub: it asks a :class:`TensorReader` for one
tensor at a time by name and hands results to a :class:`TensorWriter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

# safetensors dtype codes <-> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

# One pass over named tensors (e.g. the incoming task vectors): each call streams them anew.
TauPass = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class TensorMeta:
    """Shape and safetensors dtype code of one tensor, known without reading its data."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@runtime_checkable
class TensorReader(Protocol):
    """Lazy, name-addressed access to a set of tensors.

    Contract: ``keys()`` lists names in a stable order; ``meta(key)`` answers from
    headers only; ``get(key)`` reads just that tensor's bytes and returns a CPU tensor.
    ``source`` names the thing being read, for error messages.
    """

    source: str

    def keys(self) -> list[str]: ...

    def meta(self, key: str) -> TensorMeta: ...

    def get(self, key: str) -> torch.Tensor: ...


@runtime_checkable
class TensorWriter(Protocol):
    """Streams tensors out one at a time; nothing is visible until ``commit()``.

    ``abort()`` must leave no trace of the partial output.
    """

    def add(self, key: str, tensor: torch.Tensor) -> None: ...

    def commit(self, metadata: Mapping[str, str] | None = None) -> object: ...

    def abort(self) -> None: ...


class DictReader:
    """A :class:`TensorReader` over an in-memory mapping (tests, small models)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str = "<memory>") -> None:
        self._tensors = dict(tensors)
        self.source = source

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self._tensors[key]
        return TensorMeta(TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape))

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class DictWriter:
    """A :class:`TensorWriter` that collects tensors in memory."""

    def __init__(self) -> None:
        self._pending: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.committed = False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self._pending[key] = tensor.detach().cpu().clone()

    def commit(self, metadata: Mapping[str, str] | None = None) -> None:
        self.tensors = self._pending
        self.metadata = dict(metadata or {})
        self.committed = True

    def abort(self) -> None:
        self._pending = {}

    def reader(self, source: str = "<memory>") -> DictReader:
        return DictReader(self.tensors, source)


def read_all(reader: TensorReader, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Materialise a reader (tests and small models only)."""
    return {k: reader.get(k) for k in (reader.keys() if keys is None else keys)}
