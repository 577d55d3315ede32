"""Checkpoint sources: where a lineage watches for newly published checkpoints.

A :class:`Source` lists the COMPLETE checkpoints it holds, in publication order, each
with a stable id and a content digest. The watch flow compares that list with what
the lineage has folded or rejected.

:class:`StoreSource` watches a folder of an :class:`~mergeflow.storage.objects.ObjectStore`
(a local folder or an ``s3://`` prefix). Each immediate sub-folder is one checkpoint
(id = folder name), and so is each top-level ``*.safetensors`` file (id = file name).
A checkpoint counts only when it is complete: its folder matches a layout of
:mod:`mergeflow.storage.hf_layout` and every safetensors file of it is whole; a
top-level ``*.safetensors`` file counts when it is whole.

"Whole" means the safetensors header parses and the object size equals
``8 + header_len + largest data end offset``. Anything else (a short shard, a header
still being written, an index that is not valid JSON) may be an upload in progress, so
it is skipped, until it has stayed unchanged for :func:`settle_seconds` (default 600 s,
``MERGEFLOW_SOURCE_SETTLE_SECONDS``): then it is offered anyway, as a **broken**
checkpoint, so the fold records it as a rejected version with the exact reason instead
of ignoring it forever. Pickle-only folders are offered once settled too (a fold refuses
them unless the lineage allows pickle). An index naming shards that are not there yet
is always an upload in progress. Publication order is the latest mtime among the weight files and
index (the object that completed it), ties broken by id. The digest is
``sha256:`` + sha256 over sorted ``relpath size etag`` lines of the weight, index
and config files: on S3 the etag is content-derived, on a local folder it is
size + mtime, so a local digest changes when a file is rewritten.

:func:`mergeflow.storage.schemes.open_source` opens a source by URI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from datetime import datetime, timezone
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from mergeflow.errors import CheckpointError, MergeflowError
from mergeflow.storage.hf_layout import (
    DIGEST_CONFIG_FILES,
    INDEX_FILE,
    MAX_JSON_BYTES,
    LayoutError,
    parse_index,
    weight_layout,
)
from mergeflow.storage.objects import ObjectInfo, ReadOnlyStore
from mergeflow.storage.safetensors_file import MAX_HEADER_BYTES, parse_header

log = logging.getLogger(__name__)

HEADER_PROBE_BYTES = 256 * 1024
"""First GET when checking a header; a second GET fetches the rest of a larger header."""


class CheckpointRef(BaseModel):
    """A published checkpoint as a source lists it, and as events and tasks pass it on."""

    model_config = ConfigDict(frozen=True)

    id: str
    """Stable within the source (folder or file name); used in event resource ids."""
    uri: str
    """What :func:`mergeflow.storage.schemes.open_checkpoint` opens."""
    digest: str = ""
    """``sha256:<hex>`` over the checkpoint's files; changes when any of them changes."""
    published_at: datetime | None = None
    """When it became complete (UTC)."""
    source: str | None = None
    """The URI of the source that listed it."""


@runtime_checkable
class Source(Protocol):
    """Lists complete checkpoints, oldest publication first."""

    uri: str

    def list(self) -> list[CheckpointRef]: ...


FileState = Literal["whole", "partial", "broken"]


def settle_seconds() -> float:
    """How long a checkpoint that is not whole must stay unchanged before it is offered
    as broken (``MERGEFLOW_SOURCE_SETTLE_SECONDS``, default 600)."""
    try:
        return max(0.0, float(os.environ.get("MERGEFLOW_SOURCE_SETTLE_SECONDS", "600")))
    except ValueError:
        return 600.0


def safetensors_state(store: ReadOnlyStore, info: ObjectInfo) -> FileState:
    """``whole`` (header parses, size is exactly header + data), ``partial`` (shorter than
    its header says: maybe still being written) or ``broken`` (anything else).

    Costs one ranged GET (two for headers over 256 KiB). Never raises.
    """
    size = info.size
    if size < 8:
        return "partial"
    src = None
    try:
        src = store.byte_source(info.relpath)
        prefix = src.read(0, min(size, HEADER_PROBE_BYTES))
        (n,) = struct.unpack("<Q", prefix[:8])
        if n > MAX_HEADER_BYTES:
            return "broken"
        if 8 + n > size:
            return "partial"
        if len(prefix) < 8 + n:
            prefix = prefix[:8] + src.read(8, n)
        start, _, ranges, _ = parse_header(prefix, size, info.relpath)
    except CheckpointError as e:
        log.debug("not a whole safetensors file (yet): %s: %s", info.relpath, e)
        return "partial" if e.problem.startswith("truncated") else "broken"
    except (MergeflowError, OSError, ValueError) as e:  # a link out of the folder, a race
        log.debug("not a readable safetensors file: %s: %s", info.relpath, e)
        return "broken"
    finally:
        close = getattr(src, "close", None)
        if close:
            close()
    end = max((e for _, e in ranges.values()), default=0)
    return "whole" if size == start + end else "partial" if size < start + end else "broken"


def safetensors_whole(store: ReadOnlyStore, info: ObjectInfo) -> bool:
    """True when the object's header parses and its size is exactly header + data."""
    return safetensors_state(store, info) == "whole"


def _digest(files: list[ObjectInfo], folder: str) -> str:
    cut = len(folder) + 1 if folder else 0
    lines = sorted(f"{f.relpath[cut:]}\t{f.size}\t{f.etag}" for f in files)
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


class StoreSource:
    """Watches a folder of an object store (local or S3); see the module doc for the rules.

    Header checks are cached per (path, size, etag), so repeated ``list()`` calls on
    an unchanged source cost one LIST and no GETs.
    """

    def __init__(
        self, store: ReadOnlyStore, uri_prefix: str | None = None, settle_s: float | None = None
    ) -> None:
        self.store = store
        self.uri = (uri_prefix or store.uri).rstrip("/")
        self.settle_s = settle_seconds() if settle_s is None else settle_s
        self._state: dict[tuple[str, int, str], FileState] = {}
        self._index: dict[tuple[str, int, str], dict[str, str] | None] = {}

    def __repr__(self) -> str:
        return f"StoreSource({self.uri!r})"

    def _file_state(self, info: ObjectInfo) -> FileState:
        key = (info.relpath, info.size, info.etag)
        if key not in self._state:
            self._state[key] = safetensors_state(self.store, info)
        return self._state[key]

    def _is_whole(self, info: ObjectInfo) -> bool:
        return self._file_state(info) == "whole"

    def _weight_map(self, info: ObjectInfo) -> dict[str, str] | None:
        """An index's weight map, or None if it is not a valid index (yet)."""
        key = (info.relpath, info.size, info.etag)
        if key not in self._index:
            try:
                if info.size > MAX_JSON_BYTES:
                    raise LayoutError(f"{INDEX_FILE} is too large")
                self._index[key] = parse_index(self.store.read_bytes(info.relpath))
            except (LayoutError, MergeflowError, OSError) as e:
                log.debug("index not readable (yet): %s: %s", info.relpath, e)
                self._index[key] = None
        return self._index[key]

    def _settled(self, files: list[ObjectInfo]) -> bool:
        """Unchanged for :attr:`settle_s`: not an upload in progress any more."""
        return time.time() - max(f.mtime for f in files) >= self.settle_s

    def _layout(
        self, files: dict[str, ObjectInfo]
    ) -> tuple[list[ObjectInfo], list[ObjectInfo], tuple[str, ...]] | None:
        """(files that complete it, files its digest covers, safetensors weights to check),
        or None while the folder is no checkpoint (yet): no layout, or shards missing. A
        broken index completes it alone, with nothing to check (it is broken already)."""
        configs = [files[c] for c in DIGEST_CONFIG_FILES if c in files]
        index = self._weight_map(files[INDEX_FILE]) if INDEX_FILE in files else None
        if INDEX_FILE in files and index is None:
            return [files[INDEX_FILE]], [files[INDEX_FILE], *configs], ()
        try:
            layout = weight_layout(files, index)
        except LayoutError:
            return None
        completing = [files[f] for f in layout.files]
        members = list({f.relpath: f for f in [*completing, *configs]}.values())
        return completing, members, () if layout.kind == "pickle" else layout.weights

    def _folder_checkpoint(self, folder: str, files: dict[str, ObjectInfo]) -> CheckpointRef | None:
        """``files`` maps names directly inside ``folder`` to their info."""
        found = self._layout(files)
        if found is None:
            return None
        completing, members, weights = found
        whole = bool(weights) and all(self._is_whole(files[w]) for w in weights)
        if not whole and not self._settled(completing):
            return None
        return CheckpointRef(
            id=folder,
            uri=f"{self.uri}/{folder}",
            digest=_digest(members, folder),
            published_at=datetime.fromtimestamp(max(f.mtime for f in completing), tz=timezone.utc),
        )

    def _file_checkpoint(self, info: ObjectInfo) -> CheckpointRef | None:
        if not self._is_whole(info) and not self._settled([info]):
            return None
        return CheckpointRef(
            id=info.relpath,
            uri=f"{self.uri}/{info.relpath}",
            digest=_digest([info], ""),
            published_at=datetime.fromtimestamp(info.mtime, tz=timezone.utc),
        )

    def current_digest(self, checkpoint_id: str) -> str | None:
        """The digest ``checkpoint_id`` would be listed with now (one LIST, no GET of
        weights), or None when it is gone. Proves a checkpoint did not change between
        listing and folding."""
        infos = self.store.list(checkpoint_id)
        if len(infos) == 1 and infos[0].relpath == checkpoint_id:
            return _digest(infos, "")
        cut = len(checkpoint_id) + 1
        files = {i.relpath[cut:]: i for i in infos if "/" not in i.relpath[cut:]}
        found = self._layout(files) if files else None
        return _digest(found[1], checkpoint_id) if found else None

    def list(self) -> list[CheckpointRef]:
        """Complete (or settled broken) checkpoints in publication order (completion mtime, then id)."""
        folders: dict[str, dict[str, ObjectInfo]] = {}
        out: list[CheckpointRef] = []
        for info in self.store.list(""):
            parts = info.relpath.split("/")
            if any(p.startswith(".") for p in parts):  # hidden files, temp uploads
                continue
            if len(parts) == 1:
                if parts[0].endswith(".safetensors"):
                    ckpt = self._file_checkpoint(info)
                    if ckpt is not None:
                        out.append(ckpt)
            elif len(parts) == 2:
                folders.setdefault(parts[0], {})[parts[1]] = info
        for folder, files in folders.items():
            ckpt = self._folder_checkpoint(folder, files)
            if ckpt is not None:
                out.append(ckpt)
        out.sort(key=lambda c: (c.published_at, c.id))
        return out
