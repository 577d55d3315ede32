"""Object stores: one interface over local folders, S3 prefixes and (read-only) Hub repos.

Everything mergeflow persists (states, merged models, heads) goes through an
:class:`ObjectStore`, so the same code writes to ``/tmp/x`` and ``s3://bucket/x``; what it
only reads (a Hub repo) is a :class:`ReadOnlyStore`. Stores are opened by URI with
:func:`mergeflow.storage.schemes.open_store`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from mergeflow.errors import ConfigError
from mergeflow.storage.safetensors_file import ByteSource, LocalFile


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: path relative to the store, size, a change tag and mtime (epoch s)."""

    relpath: str
    size: int
    etag: str
    mtime: float


@runtime_checkable
class ReadOnlyStore(Protocol):
    """A flat key space of byte objects under a root URI, for reading.

    Contract: ``relpath`` uses ``/`` separators and never starts with ``/`` (a path that
    leaves the root is refused); ``list`` returns objects under a relative prefix sorted
    by path; ``exists`` is true for an object or a non-empty folder.
    """

    uri: str

    def child(self, relpath: str) -> ReadOnlyStore: ...

    def byte_source(self, relpath: str) -> ByteSource: ...

    def read_bytes(self, relpath: str) -> bytes: ...

    def exists(self, relpath: str) -> bool: ...

    def list(self, relprefix: str = "") -> list[ObjectInfo]: ...


@runtime_checkable
class ObjectStore(ReadOnlyStore, Protocol):
    """A :class:`ReadOnlyStore` that can also be written.

    ``write_bytes`` and ``put_file`` are atomic per object (readers see the whole object
    or nothing); ``delete_prefix`` removes everything under a relative prefix.
    """

    def child(self, relpath: str) -> ObjectStore: ...

    def write_bytes(self, relpath: str, data: bytes) -> None: ...

    def put_file(self, local_path: Path, relpath: str) -> None: ...

    def delete_prefix(self, relprefix: str = "") -> None: ...


class LocalStore:
    """An :class:`ObjectStore` rooted at a local folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve() if relpath else self.root
        if p != self.root and self.root.resolve() not in p.parents:
            raise ConfigError(f"path {relpath!r} escapes the store root {self.root}")
        return p

    def child(self, relpath: str) -> LocalStore:
        return LocalStore(self._path(relpath))

    def byte_source(self, relpath: str) -> ByteSource:
        return LocalFile(self._path(relpath))

    def read_bytes(self, relpath: str) -> bytes:
        return self._path(relpath).read_bytes()

    def write_bytes(self, relpath: str, data: bytes) -> None:
        p = self._path(relpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def put_file(self, local_path: Path, relpath: str) -> None:
        p = self._path(relpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, p)

    def move_file(self, local_path: Path, relpath: str) -> None:
        """Like :meth:`put_file` but consumes ``local_path``: a rename on the same filesystem."""
        p = self._path(relpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(local_path, p)
        except OSError:  # another filesystem: copy, then drop the original
            self.put_file(local_path, relpath)
            Path(local_path).unlink(missing_ok=True)

    def exists(self, relpath: str) -> bool:
        return self._path(relpath).exists()

    def list(self, relprefix: str = "") -> list[ObjectInfo]:
        base = self._path(relprefix)
        if not base.exists():
            return []
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        out = []
        for p in files:
            if p.name.startswith(".") and ".tmp-" in p.name:
                continue
            st = p.stat()
            out.append(
                ObjectInfo(
                    p.relative_to(self.root).as_posix(),
                    st.st_size,
                    f"{st.st_size}-{st.st_mtime_ns}",
                    st.st_mtime,
                )
            )
        return out

    def delete_prefix(self, relprefix: str = "") -> None:
        p = self._path(relprefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class StoreSink:
    """A :class:`~mergeflow.storage.shard_writer.ShardSink` that puts shards into a store prefix."""

    def __init__(self, store: ObjectStore, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def put(self, local_path: Path, name: str) -> None:
        """Store a finished shard; a local store takes the file by renaming it (no copy)."""
        rel = f"{self.prefix}/{name}" if self.prefix else name
        if isinstance(self.store, LocalStore):
            self.store.move_file(local_path, rel)
        else:
            self.store.put_file(local_path, rel)
