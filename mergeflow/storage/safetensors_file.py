"""Streaming safetensors IO over any byte source (local file, S3 object).

Readers parse and validate the header once, then read one tensor's byte range per
``get`` straight into the tensor's memory; they never mmap, so resident memory stays at one
tensor. The writing half is :mod:`mergeflow.storage.shard_writer`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from mergeflow.errors import CheckpointError
from mergeflow.merging.tensors import SAFETENSORS_DTYPES, TensorMeta

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Headers larger than this are refused (safetensors' own limit is the same)."""

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class ByteSource(Protocol):
    """Random access to the bytes of one file-like object.

    A source may also offer ``read_into(offset, buf: memoryview) -> None`` (fill ``buf``
    from ``offset``): readers then read each tensor straight into its memory.
    """

    name: str

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


def truncated_error(name: str, offset: int, length: int, got: int) -> CheckpointError:
    """The error for a byte range that ends early (every byte source says it the same way)."""
    return CheckpointError(name, f"truncated: wanted {length} bytes at offset {offset}, got {got}")


class LocalFile:
    """A :class:`ByteSource` over a local file, kept open between reads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(path)
        self._fh: BinaryIO | None = None

    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise truncated_error(self.name, offset, length, len(data))
        return data

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (straight from the page cache)."""
        if self._fh is None:
            self._fh = open(self.path, "rb")
        fd, done, length = self._fh.fileno(), 0, len(buf)
        while done < length:
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise truncated_error(self.name, offset, length, done)
            done += n

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class HeaderPrefix(Protocol):
    """Optional fast path: a source that can return a speculative prefix in one request."""

    def read_prefix(self, length: int) -> bytes: ...


MAX_TENSORS = 1 << 18
"""Tensors one safetensors file may declare (262 144; the largest public checkpoints hold
far fewer per shard). Counted on the raw header bytes before any JSON is parsed."""


MAX_DIMS = 64
"""Dimensions one tensor may have (torch's own limit); bounds the cost of its element count."""


def _short(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a hostile header must not flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json`` object hook: a name declared twice is an error, not "the last one wins"."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def parse_header(
    prefix: bytes, file_size: int, source: str
) -> tuple[int, dict[str, TensorMeta], dict[str, tuple[int, int]], dict[str, str]]:
    """Validate a safetensors header.

    ``prefix`` holds at least the first ``8 + header_len`` bytes. Returns
    ``(data_start, metas, byte ranges relative to data_start, metadata)``.
    Every structural problem raises :class:`CheckpointError` naming ``source``: a
    header over :data:`MAX_HEADER_BYTES` or declaring more than :data:`MAX_TENSORS`
    tensors (refused before parsing), invalid JSON (including nesting too deep or
    numbers too long to parse), a tensor name declared twice, an entry without dtype,
    shape and data_offsets, offsets reversed, overlapping, not matching the shape or
    past the end of the file. Nothing is allocated in proportion to the declared sizes.
    """
    if file_size < 8:
        raise CheckpointError(
            source, f"file is empty or truncated ({file_size} bytes); not a safetensors file"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            source,
            f"safetensors header claims {n} bytes, more than the {MAX_HEADER_BYTES // 2**20} MiB limit",
        )
    if 8 + n > file_size:
        raise CheckpointError(
            source, f"truncated: header claims {n} bytes but the file has only {file_size}"
        )
    if len(prefix) < 8 + n:
        raise ValueError("prefix shorter than the header")
    raw = prefix[8 : 8 + n]
    declared = raw.count(b'"data_offsets"')
    if declared > MAX_TENSORS:
        raise CheckpointError(
            source,
            f"safetensors header declares {declared} tensors, more than the {MAX_TENSORS} one file may hold",
        )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(
            source, f"safetensors header declares {e.key!r} more than once"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers json.JSONDecodeError and integers too long to convert
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(source, f"safetensors header is not valid JSON ({msg})") from None
    if not isinstance(header, dict):
        raise CheckpointError(source, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(source, "safetensors __metadata__ must map strings to strings")
    data_len = file_size - 8 - n
    metas: dict[str, TensorMeta] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(
                source, f"tensor {key!r}: header entry needs dtype, shape and data_offsets"
            )
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CheckpointError(source, f"tensor {key!r}: unsupported dtype {_short(dtype)}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
            )
        ):
            raise CheckpointError(
                source,
                f"tensor {key!r}: shape {_short(shape)} is not a list of non-negative integers (at most {MAX_DIMS})",
            )
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(source, f"tensor {key!r}: bad data_offsets {_short(offs)}")
        meta = TensorMeta(dtype, tuple(shape))
        if offs[1] - offs[0] != meta.numel * DTYPE_SIZES[dtype]:
            raise CheckpointError(
                source,
                f"tensor {key!r}: data_offsets span {offs[1] - offs[0]} bytes but {dtype}{_short(shape)} needs {meta.numel * DTYPE_SIZES[dtype]}",
            )
        if offs[1] > data_len:
            raise CheckpointError(
                source,
                f"truncated: tensor {key!r} ends at byte {offs[1]} of the data but the file holds {data_len}",
            )
        metas[key] = meta
        ranges[key] = (offs[0], offs[1])
    spans = sorted(ranges.values())
    for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CheckpointError(source, "tensor byte ranges overlap in the safetensors header")
    return 8 + n, metas, ranges, metadata


def tensor_from_bytes(data: bytes | bytearray, meta: TensorMeta) -> torch.Tensor:
    """Build a CPU tensor owning ``data`` (little-endian safetensors layout)."""
    dtype = SAFETENSORS_DTYPES[meta.dtype]
    if meta.numel == 0:
        return torch.empty(meta.shape, dtype=dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=dtype).reshape(meta.shape)


class SafetensorsReader:
    """A :class:`~mergeflow.merging.tensors.TensorReader` over one safetensors byte source."""

    SPECULATIVE_PREFIX = 1 << 20

    def __init__(self, source: ByteSource, label: str | None = None) -> None:
        self._src = source
        self.source = label or source.name
        size = source.size()
        if size < 8:
            raise CheckpointError(
                self.source, f"file is empty or truncated ({size} bytes); not a safetensors file"
            )
        reader = getattr(source, "read_prefix", None)
        prefix = (
            reader(min(size, self.SPECULATIVE_PREFIX)) if reader else source.read(0, min(size, 8))
        )
        (n,) = struct.unpack("<Q", prefix[:8])
        if len(prefix) < 8 + n and 8 + n <= size and n <= MAX_HEADER_BYTES:
            prefix = prefix[:8] + source.read(8, n)
        self._start, self._metas, self._ranges, self.metadata = parse_header(
            prefix, size, self.source
        )

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> TensorMeta:
        return self._metas[key]

    def get(self, key: str) -> torch.Tensor:
        b, e = self._ranges[key]
        meta = self._metas[key]
        read_into = getattr(self._src, "read_into", None)
        if read_into is None or e == b:
            data = self._src.read(self._start + b, e - b) if e > b else b""
            return tensor_from_bytes(data, meta)
        t = torch.empty(meta.numel, dtype=SAFETENSORS_DTYPES[meta.dtype])
        read_into(self._start + b, t.view(torch.uint8).numpy().data)
        return t.reshape(meta.shape)

    def close(self) -> None:
        close = getattr(self._src, "close", None)
        if close:
            close()
