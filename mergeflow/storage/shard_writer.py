"""Streaming safetensors writing: tensors into size-bounded shards, spooled, then given to a sink.

A :class:`ShardedWriter` appends each tensor's raw bytes to a spool file per shard and puts
the header in front when the shard closes: in place where the filesystem can insert a
range, else by a copy. The finished shards go to a :class:`ShardSink` (a local folder, an
S3 prefix: :class:`mergeflow.storage.objects.StoreSink`), at the commit or, in the
background, while the next shard is written. The reading half is
:mod:`mergeflow.storage.safetensors_file`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from mergeflow.merging.tensors import TORCH_TO_SAFETENSORS

FALLOC_FL_INSERT_RANGE = 0x20
"""Linux ``fallocate`` mode that inserts a hole at an offset, shifting the data after it."""


def _insert_range(fd: int, length: int) -> bool:
    """Insert ``length`` bytes (whole filesystem blocks) at the start of the file, in place;
    False where the kernel or the filesystem cannot (ext4 and XFS can; tmpfs cannot)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return bool(fallocate(fd, FALLOC_FL_INSERT_RANGE, 0, length) == 0)


def _with_header(data_path: Path, header: bytes) -> Path:
    """The finished shard: the header's length, ``header`` padded with spaces, then the data
    spooled at ``data_path``. Where the filesystem can insert a range, the data stays where
    it is (the header is padded to whole blocks); elsewhere it is copied into a new file."""
    fd = os.open(data_path, os.O_RDWR)
    try:
        block = os.fstatvfs(fd).f_bsize
        lead = -(-(8 + len(header)) // block) * block
        if os.fstat(fd).st_size > 0 and _insert_range(fd, lead):
            padded = header + b" " * (lead - 8 - len(header))
            os.pwrite(fd, struct.pack("<Q", len(padded)) + padded, 0)
            return data_path
    finally:
        os.close(fd)
    padded = header + b" " * (-len(header) % 8)
    out = data_path.with_suffix(".safetensors")
    with open(out, "wb") as fo, open(data_path, "rb") as fi:
        fo.write(struct.pack("<Q", len(padded)))
        fo.write(padded)
        fo.flush()
        _append(fi, fo)
    data_path.unlink()
    return out


def _append(src: BinaryIO, dst: BinaryIO) -> None:
    """Append all of ``src`` to ``dst`` in the kernel (``copy_file_range``), else by chunks."""
    size = os.fstat(src.fileno()).st_size
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - done)
            if n == 0:
                break
            done += n
    except OSError:  # not supported here (old kernel, some filesystems): the rest in Python
        pass
    if done < size:
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 16 * 2**20)


class ShardSink(Protocol):
    """Receives finished shard files from :class:`ShardedWriter` (it may move them away)."""

    def put(self, local_path: Path, name: str) -> None: ...


SPOOL_PREFIX = "mergeflow-spool-"
"""Spool folders are ``<TMPDIR>/mergeflow-spool-<pid>-<random>``."""


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def sweep_stale_spools(parent: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the spool folders of processes that died without cleaning up (a killed fold);
    a folder whose process still runs, or whose name is not ours, stays. Returns the removed."""
    root = Path(parent or tempfile.gettempdir())
    removed = []
    for d in root.glob(f"{SPOOL_PREFIX}*-*"):
        pid = d.name[len(SPOOL_PREFIX) :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and _pid_gone(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class ShardedWriter:
    """Streams tensors into size-bounded safetensors shards plus an HF index.

    Memory holds one tensor: bytes go to a spool file, and the header goes in front of
    them when the shard closes (:func:`_with_header`). By default every shard goes to
    ``sink`` at :meth:`commit`, named ``{prefix}-0000i-of-0000n.safetensors`` (or
    ``{prefix}.safetensors`` alone), and the index (when there is more than one shard) last.

    ``background``: a shard goes to ``sink`` as soon as the next one opens, in a background
    thread, while the caller goes on adding tensors; so an upload overlaps the work that
    produces the next shard. One hand-off runs at a time (the spool holds at most the shard
    being written and the one being handed off). The count is unknown then, so several
    shards are named ``{prefix}-0000i.safetensors`` (the index says how they fit; one shard
    alone is still ``{prefix}.safetensors``), and every shard carries the ``metadata`` given
    here. A failed hand-off is raised by the next :meth:`add` or :meth:`commit`. Shards
    already handed off stay in the sink after :meth:`abort`: the caller removes its prefix
    (:class:`mergeflow.storage.states.StateWrite` does).
    """

    def __init__(
        self,
        sink: ShardSink,
        max_shard_size: int = 5 * 2**30,
        prefix: str = "model",
        spool_dir: str | None = None,
        *,
        background: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if max_shard_size <= 0:
            raise ValueError("max_shard_size must be positive")
        self._sink = sink
        self._max = max_shard_size
        self._prefix = prefix
        self._background = background
        self._metadata = dict(metadata or {})
        sweep_stale_spools(spool_dir)
        self._spool = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=spool_dir))
        self._shards: list[tuple[Path, dict[str, dict]]] = []
        self._cur_header: dict[str, dict] = {}
        self._cur_fh: BinaryIO | None = None
        self._cur_size = 0
        self._keys: set[str] = set()
        self._handed: dict[str, str] = {}  # tensor -> shard name, of shards in the sink
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self.total_size = 0

    def _open_shard(self) -> None:
        path = self._spool / f"shard-{len(self._shards):05d}.data"
        self._cur_fh = open(path, "wb")
        self._cur_header = {}
        self._cur_size = 0
        self._shards.append((path, self._cur_header))

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise ValueError(f"tensor {key!r} written twice")
        if self._pending is not None and self._pending.done():
            self._wait()
        self._keys.add(key)
        t = tensor.detach().to("cpu").contiguous()
        code = TORCH_TO_SAFETENSORS[t.dtype]
        nbytes = t.numel() * t.element_size()
        if self._cur_fh is None or (self._cur_size > 0 and self._cur_size + nbytes > self._max):
            self._close_data()
            if self._background and self._shards:
                self._hand_off(len(self._shards) - 1)
            self._open_shard()
        assert self._cur_fh is not None
        if nbytes:
            self._cur_fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._cur_header[key] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [self._cur_size, self._cur_size + nbytes],
        }
        self._cur_size += nbytes
        self.total_size += nbytes

    def _close_data(self) -> None:
        if self._cur_fh is not None:
            self._cur_fh.close()
            self._cur_fh = None

    def _finish(self, i: int, name: str, meta: Mapping[str, str]) -> None:
        """Put the header in front of shard ``i``'s data and give the shard to the sink."""
        data_path, header = self._shards[i]
        full = {"__metadata__": {"format": "pt", **meta}, **header}
        out = _with_header(data_path, json.dumps(full, separators=(",", ":")).encode())
        self._sink.put(out, name)
        out.unlink(missing_ok=True)

    def _wait(self) -> None:
        """Wait for the hand-off in flight; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _hand_off(self, i: int) -> None:
        """Give shard ``i`` to the sink in the background, once the previous hand-off is done."""
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergeflow-shard")
        name = self._background_name(i)
        self._pending = self._pool.submit(self._finish, i, name, dict(self._metadata))
        self._handed.update(dict.fromkeys(self._shards[i][1], name))

    def _background_name(self, i: int) -> str:
        """Shard ``i``'s name when shards leave before the count is known."""
        return f"{self._prefix}-{i + 1:05d}.safetensors"

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def commit(self, metadata: Mapping[str, str] | None = None) -> list[str]:
        """Assemble every shard, hand them to the sink, and write the index. Returns shard names.

        ``metadata`` goes into every shard and the index (by default the constructor's); a
        background writer that already handed a shard off refuses other metadata."""
        self._close_data()
        if not self._shards:
            self._open_shard()
            self._close_data()
        meta = dict(self._metadata if metadata is None else metadata)
        n = len(self._shards)
        try:
            self._wait()
            if self._handed and meta != self._metadata:
                raise ValueError(
                    "a background ShardedWriter writes the metadata it was made with "
                    f"({self._metadata}); commit got {meta}"
                )
            if self._background and n > 1:
                names = [self._background_name(i) for i in range(n)]
                todo = [n - 1]
            else:
                names = (
                    [f"{self._prefix}.safetensors"]
                    if n == 1
                    else [f"{self._prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
                )
                todo = list(range(n))
            weight_map: dict[str, str] = dict(self._handed)
            for i in todo:
                self._finish(i, names[i], meta)
                weight_map.update(dict.fromkeys(self._shards[i][1], names[i]))
            if n > 1:
                idx = self._spool / f"{self._prefix}.safetensors.index.json"
                idx.write_text(
                    json.dumps(
                        {
                            "metadata": {"total_size": self.total_size, **meta},
                            "weight_map": weight_map,
                        },
                        indent=2,
                    )
                )
                self._sink.put(idx, idx.name)
        finally:
            self._stop()
            shutil.rmtree(self._spool, ignore_errors=True)
        return names

    def abort(self) -> None:
        """Drop the spool (after the hand-off in flight, whose error is dropped too)."""
        self._close_data()
        try:
            self._wait()
        except Exception:
            pass
        finally:
            self._stop()
            shutil.rmtree(self._spool, ignore_errors=True)
