"""Hugging Face Hub access through ``huggingface_hub``: ranged reads and a watcher.

URIs have the form ``hf://org/repo[@revision][/subfolder]``. The revision (branch, tag or
commit sha; default ``main``; percent-encode a ``/`` in it) is resolved to a commit sha
once, and every later request names that sha, so a checkpoint opened from the Hub can
never change under a fold. Weight files are read with HTTP ``Range`` requests through the
library's shared HTTP session (redirects to the CDN / Xet bridge are followed); whole
weight files are never downloaded.

Errors: a missing repo, revision or file (and gated/private repos without access) raise
:class:`~mergeflow.errors.CheckpointError` when reading and
:class:`~mergeflow.errors.ConfigError` from :class:`HubSource`. Transient failures
(network, 5xx after the library's retries) propagate as the library's own exceptions
(``OSError`` subclasses) so IO retries can handle them and a checkpoint is never
rejected for a network blip.

Endpoint: the explicit argument, else ``HF_ENDPOINT`` (read at call time), else the
public Hub. Token: the explicit argument, else the library's default (``HF_TOKEN`` or
the stored ``hf auth login`` token).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.utils import (
    build_hf_headers,
    hf_raise_for_status,
    http_backoff,
    http_stream_backoff,
)

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.storage.hf_layout import INDEX_FILE, LayoutError, parse_index, weight_layout
from mergeflow.storage.hub.refs import SHA_RE, HubRef, hub_errors, resolve_endpoint
from mergeflow.storage.objects import ObjectInfo
from mergeflow.storage.safetensors_file import truncated_error


@dataclass(frozen=True)
class HubFileInfo:
    """One file in a repo at a commit: size and change tag (LFS sha256, else git blob id)."""

    path: str
    size: int | None
    etag: str | None
    sha256: str | None


class _InfoCache:
    """Process-wide cache of repo listings by commit sha (immutable, so never stale)."""

    def __init__(self, maxsize: int = 4096) -> None:
        self._d: OrderedDict[
            tuple[str, str, str], tuple[dict[str, HubFileInfo], dict | None, datetime | None]
        ] = OrderedDict()
        self._lock = threading.Lock()
        self._max = maxsize

    def get(
        self, key: tuple[str, str, str]
    ) -> tuple[dict[str, HubFileInfo], dict | None, datetime | None] | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(
        self,
        key: tuple[str, str, str],
        value: tuple[dict[str, HubFileInfo], dict | None, datetime | None],
    ) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self._max:
                self._d.popitem(last=False)


_CACHE = _InfoCache()
_INDEX_CACHE: dict[tuple[str, str, str], dict[str, str] | None] = {}


def card_dict(card: object) -> dict | None:
    if card is None:
        return None
    to_dict = getattr(card, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(card) if isinstance(card, dict) else None


class HubRepo:
    """One Hub model repo pinned at a commit.

    Construction resolves ``revision`` to a commit sha with one ``model_info`` call (which
    also lists every file with its size and LFS sha256); all later reads name the sha.
    """

    def __init__(
        self,
        repo_id: str,
        revision: str | None = None,
        *,
        endpoint: str | None = None,
        token: str | bool | None = None,
        api: HfApi | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.endpoint = resolve_endpoint(endpoint or (api.endpoint if api else None))
        self.token = token
        self.api = api or HfApi(endpoint=self.endpoint, token=token)
        requested = revision or constants.DEFAULT_REVISION
        label = HubRef(repo_id, requested).uri()
        cached = (
            _CACHE.get((self.endpoint, repo_id, requested)) if SHA_RE.match(requested) else None
        )
        if cached is not None:
            self.sha = requested
            self.files, self.card_data, self.last_modified = cached
        else:
            with hub_errors(label):
                info = self.api.model_info(repo_id, revision=requested, files_metadata=True)
            if not info.sha:
                raise CheckpointError(
                    label, "the Hub did not report a commit sha for this revision"
                )
            self.sha = info.sha
            self.files = {
                s.rfilename: HubFileInfo(
                    s.rfilename,
                    s.size if s.size is not None else (s.lfs.size if s.lfs else None),
                    s.lfs.sha256 if s.lfs else s.blob_id,
                    s.lfs.sha256 if s.lfs else None,
                )
                for s in info.siblings or []
            }
            self.card_data = card_dict(info.card_data)
            self.last_modified = info.last_modified
            _CACHE.put(
                (self.endpoint, repo_id, self.sha), (self.files, self.card_data, self.last_modified)
            )

    @classmethod
    def from_uri(
        cls, uri: str, *, endpoint: str | None = None, token: str | bool | None = None
    ) -> HubRepo:
        ref = HubRef.parse(uri)
        return cls(ref.repo_id, ref.revision, endpoint=endpoint, token=token)

    @property
    def uri(self) -> str:
        """``hf://org/repo@<sha>``: this repo pinned at its commit."""
        return HubRef(self.repo_id, self.sha).uri()

    def file_uri(self, path: str) -> str:
        return f"{self.uri}/{path}"

    def url(self, path: str) -> str:
        return hf_hub_url(self.repo_id, path, revision=self.sha, endpoint=self.endpoint)

    def headers(self) -> dict[str, str]:
        h = build_hf_headers(token=self.token)
        h["Accept-Encoding"] = "identity"  # byte ranges refer to the stored bytes
        return h

    def _info(self, path: str) -> HubFileInfo:
        info = self.files.get(path)
        if info is None:
            raise CheckpointError(
                self.file_uri(path), f"no such file in {self.repo_id} at commit {self.sha}"
            )
        return info

    def byte_source(self, path: str) -> HubFile:
        """A ranged-read :class:`~mergeflow.storage.safetensors_file.ByteSource` over one file."""
        return HubFile(self, path, self._info(path).size)

    def read_bytes(self, path: str) -> bytes:
        """Download one (small) file whole: config.json, an index, adapter_config.json."""
        self._info(path)
        with hub_errors(self.file_uri(path)):
            r = http_backoff(
                "GET",
                self.url(path),
                headers=self.headers(),
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            )
            hf_raise_for_status(r)
        return r.content

    def weight_files(self, subfolder: str = "") -> list[str]:
        """The files that make ``subfolder`` a checkpoint (:func:`~mergeflow.storage.hf_layout.weight_layout`).

        Empty when the folder holds no loadable safetensors weights (pickle files do not
        count on the Hub). Reads at most the index (cached per commit); a broken index
        lists its own name only, so the checkpoint is rejected with its reason when opened.
        """
        pre = f"{subfolder}/" if subfolder else ""
        names = {p[len(pre) :] for p in self.files if _parent(p) == subfolder}
        index = self._index(pre + INDEX_FILE) if INDEX_FILE in names else None
        if INDEX_FILE in names and index is None:
            return [INDEX_FILE]
        try:
            layout = weight_layout(names, index)
        except LayoutError:
            return []
        return [] if layout.kind == "pickle" else list(layout.files)

    def _index(self, path: str) -> dict[str, str] | None:
        key = (self.endpoint, self.repo_id, f"{self.sha}/{path}")
        if key not in _INDEX_CACHE:
            try:
                wm: dict[str, str] | None = parse_index(self.read_bytes(path))
            except LayoutError:
                wm = None
            if len(_INDEX_CACHE) > 4096:
                _INDEX_CACHE.clear()
            _INDEX_CACHE[key] = wm
        return _INDEX_CACHE[key]

    def has_weights(self, subfolder: str = "") -> bool:
        """True when ``subfolder`` holds loadable safetensors weights (see :meth:`weight_files`)."""
        return bool(self.weight_files(subfolder))

    def content_digest(self, subfolder: str = "") -> str:
        """``sha256:`` over ``name, size, etag`` of each :meth:`weight_files` entry.

        Uses the Hub's own per-file hashes (LFS sha256, else git blob id), so no weight
        byte is downloaded, and equals ``OpenedCheckpoint.digest()`` of the checkpoint opened
        from this store (same formula over the store listing).
        """
        pre = f"{subfolder}/" if subfolder else ""
        h = hashlib.sha256()
        for rel in sorted(self.weight_files(subfolder)):
            f = self.files.get(pre + rel)
            size, etag = (f.size or 0, f.etag or "") if f else (-1, "")
            h.update(f"{rel}\0{size}\0{etag}\n".encode())
        return f"sha256:{h.hexdigest()}"

    def store(self, subfolder: str = "") -> HubStore:
        return HubStore(self, subfolder)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


class HubFile:
    """A :class:`~mergeflow.storage.safetensors_file.ByteSource` for one file of a pinned repo.

    Every ``read`` is one HTTP ``GET`` with a ``Range`` header on the file's ``resolve``
    URL at the pinned sha. A server that ignores ``Range`` is refused before its body is
    read, so a weight file is never downloaded whole by accident.
    """

    def __init__(self, repo: HubRepo, path: str, size: int | None = None) -> None:
        self.repo = repo
        self.path = path
        self.name = repo.file_uri(path)
        self._size = size

    def size(self) -> int:
        if self._size is None:
            with hub_errors(self.name):
                meta = get_hf_file_metadata(
                    self.repo.url(self.path), token=self.repo.token, endpoint=self.repo.endpoint
                )
            if meta.size is None:
                raise CheckpointError(self.name, "the Hub did not report the file size")
            self._size = meta.size
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        size = self.size()
        if offset < 0 or offset + length > size:
            raise CheckpointError(
                self.name,
                f"truncated: wanted {length} bytes at offset {offset} of a {size}-byte file",
            )
        headers = self.repo.headers() | {"Range": f"bytes={offset}-{offset + length - 1}"}
        with hub_errors(self.name):
            with http_stream_backoff(
                "GET",
                self.repo.url(self.path),
                headers=headers,
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    hf_raise_for_status(r)
                if r.status_code != 206 and not (
                    r.status_code == 200 and offset == 0 and length == size
                ):
                    raise CheckpointError(
                        self.name,
                        f"the server ignored the byte range (HTTP {r.status_code}); refusing to download the whole file",
                    )
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > length:
                        break
        if len(data) != length:
            raise truncated_error(self.name, offset, length, len(data))
        return bytes(data)

    def read_prefix(self, length: int) -> bytes:
        """The first ``length`` bytes (capped at the file size) in one request."""
        return self.read(0, min(length, self.size()))

    def close(self) -> None:
        """Nothing to release: the HTTP session is the library's shared one."""


class HubStore:
    """A read-only :class:`~mergeflow.storage.objects.ObjectStore` over a pinned repo (sub)folder.

    ``uri`` is ``hf://org/repo@<sha>[/subfolder]``. Writes raise :class:`ConfigError`.
    ``ObjectInfo.etag`` is the LFS sha256 (else git blob id); ``mtime`` is the repo's
    last-modified time as the Hub reports it (0 when unknown).
    """

    def __init__(self, repo: HubRepo, subfolder: str = "") -> None:
        self.repo = repo
        self.subfolder = subfolder.strip("/")
        self.uri = HubRef(repo.repo_id, repo.sha, self.subfolder).uri()

    def _full(self, relpath: str) -> str:
        rel = relpath.strip("/")
        if any(part in (".", "..") for part in rel.split("/")):
            raise ConfigError(f"path {relpath!r} escapes the store root {self.uri}")
        return f"{self.subfolder}/{rel}".strip("/") if self.subfolder else rel

    def child(self, relpath: str) -> HubStore:
        return HubStore(self.repo, self._full(relpath))

    def byte_source(self, relpath: str) -> HubFile:
        return self.repo.byte_source(self._full(relpath))

    def read_bytes(self, relpath: str) -> bytes:
        return self.repo.read_bytes(self._full(relpath))

    def exists(self, relpath: str) -> bool:
        full = self._full(relpath)
        return (
            full in self.repo.files
            or any(p.startswith(f"{full}/") for p in self.repo.files)
            or (full == "" and bool(self.repo.files))
        )

    def list(self, relprefix: str = "") -> list[ObjectInfo]:
        full = self._full(relprefix)
        root = f"{self.subfolder}/" if self.subfolder else ""
        mtime = self.repo.last_modified.timestamp() if self.repo.last_modified else 0.0
        out = []
        for p in sorted(self.repo.files):
            if full and p != full and not p.startswith(f"{full}/"):
                continue
            if root and not p.startswith(root):
                continue
            f = self.repo.files[p]
            out.append(ObjectInfo(p[len(root) :], f.size or 0, f.etag or "", mtime))
        return out

    def has_weights(self) -> bool:
        return self.repo.has_weights(self.subfolder)

    def content_digest(self) -> str:
        return self.repo.content_digest(self.subfolder)


def open_hub_store(
    uri: str, *, endpoint: str | None = None, token: str | bool | None = None
) -> HubStore:
    """Open ``hf://org/repo[@revision][/subfolder]`` as a read-only store pinned at a commit sha."""
    ref = HubRef.parse(uri)
    return HubRepo(ref.repo_id, ref.revision, endpoint=endpoint, token=token).store(ref.subfolder)
