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
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (
    build_hf_headers,
    hf_raise_for_status,
    http_backoff,
    http_stream_backoff,
)

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.storage.sources import PublishedCheckpoint
from mergeflow.storage.store import ObjectInfo

SCHEME = "hf://"
INDEX = "model.safetensors.index.json"

_URI_RE = re.compile(
    r"^hf://(?P<repo>[\w.\-]+/[\w.\-]+|[\w.\-]+(?=@|$))(?:@(?P<rev>[^/]+))?(?P<sub>/.*)?$"
)
"""Two-segment repo ids; a one-segment id (``hf://gpt2``) only without a subfolder or with ``@rev``."""
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint to use: the argument, ``HF_ENDPOINT`` now, or the library default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://org/repo[@revision][/subfolder]`` URI."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def parse(cls, uri: str) -> HubRef:
        """Parse a URI; a bad one raises :class:`ConfigError`."""
        m = _URI_RE.match(uri.strip())
        if not m or ".." in m["repo"]:
            raise ConfigError(f"bad Hub URI {uri!r}: expected hf://org/repo[@revision][/subfolder]")
        sub = (m["sub"] or "").strip("/")
        if any(part in ("", ".", "..") for part in sub.split("/")) and sub:
            raise ConfigError(
                f"bad Hub URI {uri!r}: the subfolder {sub!r} is not a clean relative path"
            )
        return cls(m["repo"], unquote(m["rev"]) if m["rev"] else None, sub)

    def uri(self) -> str:
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{SCHEME}{self.repo_id}{rev}{sub}"


def is_hub_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


@contextmanager
def _hub_errors(label: str, error: type[Exception] = CheckpointError) -> Iterator[None]:
    """Turn definite Hub answers (not found, no access) into mergeflow errors naming ``label``."""

    def fail(problem: str) -> Exception:
        return (
            CheckpointError(label, problem)
            if error is CheckpointError
            else error(f"{label}: {problem}")
        )

    try:
        yield
    except RevisionNotFoundError:
        raise fail("revision not found on the Hub") from None
    except GatedRepoError:
        raise fail("gated repository: accept its conditions on the Hub and set HF_TOKEN") from None
    except DisabledRepoError:
        raise fail("repository is disabled on the Hub") from None
    except RepositoryNotFoundError:
        raise fail(
            "repository not found on the Hub (or private: set HF_TOKEN or run `hf auth login`)"
        ) from None
    except EntryNotFoundError as e:
        raise fail(f"file not found in the repository ({e.__class__.__name__})") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise fail(f"access denied by the Hub (HTTP {status}); check HF_TOKEN") from None
        if status is not None and 400 <= status < 500 and status != 429:
            raise fail(f"the Hub refused the request (HTTP {status}): {e}") from None
        raise


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
_INDEX_CACHE: dict[tuple[str, str, str], list[str]] = {}


def _card_dict(card: object) -> dict | None:
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
            _CACHE.get((self.endpoint, repo_id, requested)) if _SHA_RE.match(requested) else None
        )
        if cached is not None:
            self.sha = requested
            self.files, self.card_data, self.last_modified = cached
        else:
            with _hub_errors(label):
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
            self.card_data = _card_dict(info.card_data)
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
        """A ranged-read :class:`~mergeflow.storage.safetensors_io.ByteSource` over one file."""
        return HubFile(self, path, self._info(path).size)

    def read_bytes(self, path: str) -> bytes:
        """Download one (small) file whole: config.json, an index, adapter_config.json."""
        self._info(path)
        with _hub_errors(self.file_uri(path)):
            r = http_backoff(
                "GET",
                self.url(path),
                headers=self.headers(),
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            )
            hf_raise_for_status(r)
        return r.content

    def weight_files(self, subfolder: str = "") -> list[str]:
        """The files that make ``subfolder`` a checkpoint, chosen as ``open_weights`` does.

        In order: the sharded index plus the shards it names; ``model.safetensors``;
        ``adapter_config.json`` + ``adapter_model.safetensors``; a single bare
        ``.safetensors`` file. Empty when the folder holds no loadable safetensors
        weights. Reads at most the index (cached per commit).
        """
        pre = f"{subfolder}/" if subfolder else ""
        names = {p[len(pre) :] for p in self.files if _parent(p) == subfolder}
        if INDEX in names:
            return [INDEX, *self._index_shards(pre + INDEX)]
        if "model.safetensors" in names:
            return ["model.safetensors"]
        if "adapter_config.json" in names:
            has_adapter = "adapter_model.safetensors" in names
            return ["adapter_config.json", "adapter_model.safetensors"] if has_adapter else []
        bare = sorted(n for n in names if n.endswith(".safetensors"))
        return bare if len(bare) == 1 else []

    def _index_shards(self, path: str) -> list[str]:
        key = (self.endpoint, self.repo_id, f"{self.sha}/{path}")
        shards = _INDEX_CACHE.get(key)
        if shards is None:
            try:
                wm = json.loads(self.read_bytes(path)).get("weight_map")
                shards = sorted({v for v in wm.values() if isinstance(v, str)})
            except (ValueError, AttributeError):
                shards = []  # a broken index: listed, then rejected with its reason when opened
            if len(_INDEX_CACHE) > 4096:
                _INDEX_CACHE.clear()
            _INDEX_CACHE[key] = shards
        return shards

    def has_weights(self, subfolder: str = "") -> bool:
        """True when ``subfolder`` holds loadable safetensors weights (see :meth:`weight_files`)."""
        return bool(self.weight_files(subfolder))

    def content_digest(self, subfolder: str = "") -> str:
        """``sha256:`` over ``name, size, etag`` of each :meth:`weight_files` entry.

        Uses the Hub's own per-file hashes (LFS sha256, else git blob id), so no weight
        byte is downloaded, and equals ``Checkpoint.digest()`` of the checkpoint opened
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
    """A :class:`~mergeflow.storage.safetensors_io.ByteSource` for one file of a pinned repo.

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
            from huggingface_hub import get_hf_file_metadata

            with _hub_errors(self.name):
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
        with _hub_errors(self.name):
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
            raise CheckpointError(
                self.name, f"truncated: wanted {length} bytes at offset {offset}, got {len(data)}"
            )
        return bytes(data)

    def read_prefix(self, length: int) -> bytes:
        """The first ``length`` bytes (capped at the file size) in one request."""
        return self.read(0, min(length, self.size()))

    def close(self) -> None:
        """Nothing to release: the HTTP session is the library's shared one."""


class HubStore:
    """A read-only :class:`~mergeflow.storage.store.ObjectStore` over a pinned repo (sub)folder.

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

    def _read_only(self, *_: object) -> None:
        raise ConfigError(f"{self.uri} is read-only: mergeflow never writes to the Hub")

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self._read_only()

    def put_file(self, local_path: Path, relpath: str) -> None:
        self._read_only()

    def delete_prefix(self, relprefix: str = "") -> None:
        self._read_only()


def open_hub_store(
    uri: str, *, endpoint: str | None = None, token: str | bool | None = None
) -> HubStore:
    """Open ``hf://org/repo[@revision][/subfolder]`` as a read-only store pinned at a commit sha."""
    ref = HubRef.parse(uri)
    return HubRepo(ref.repo_id, ref.revision, endpoint=endpoint, token=token).store(ref.subfolder)


def _base_models(card: dict | None) -> list[str]:
    b = (card or {}).get("base_model")
    return (
        [b]
        if isinstance(b, str)
        else [x for x in b if isinstance(x, str)]
        if isinstance(b, list)
        else []
    )


class HubSource:
    """Watches the Hub for published checkpoints. Implements ``Source.list()``.

    Two modes, combinable:

    - ``repos``: every commit of each repo's ``branch`` (``org/repo`` or
      ``hf://org/repo[@branch]``) whose tree holds weights is a checkpoint
      ``hf://org/repo@<sha>``. With ``skip_unchanged`` (default) a commit whose content
      digest equals the previous listed commit's (a README edit) is skipped, so the same
      weights are never folded twice.
    - ``base_model``: every repo whose card metadata ``base_model`` names this repo
      (``org/repo`` or an ``hf://`` URI), taken at its latest commit on ``main``.

    Ids and URIs are ``hf://org/repo@<sha>``; the digest is the content digest
    (:meth:`HubRepo.content_digest`); ``published_at`` is the commit date (for discovered
    repos, the Hub's last-modified time). The list is sorted by ``(published_at, id)``.
    Listings at a sha are cached process-wide, so repeated polls cost one commit listing
    per watched repo, one search, and one ``model_info`` per discovered repo.
    """

    def __init__(
        self,
        repos: Sequence[str] = (),
        *,
        base_model: str | None = None,
        endpoint: str | None = None,
        token: str | bool | None = None,
        skip_unchanged: bool = True,
        exclude: Sequence[str] = (),
    ) -> None:
        if not repos and not base_model:
            raise ConfigError(
                "Hub source: give repos to watch, a base_model to discover fine-tunes of, or both"
            )
        self.watch: list[tuple[str, str]] = []
        for r in repos:
            ref = HubRef.parse(r if is_hub_uri(r) else f"{SCHEME}{r}")
            if ref.subfolder:
                raise ConfigError(f"Hub source: {r!r}: watching a subfolder is not supported")
            self.watch.append((ref.repo_id, ref.revision or constants.DEFAULT_REVISION))
        self.base_model = None
        if base_model:
            self.base_model = HubRef.parse(
                base_model if is_hub_uri(base_model) else f"{SCHEME}{base_model}"
            ).repo_id
        self.endpoint = resolve_endpoint(endpoint)
        self.token = token
        self.skip_unchanged = skip_unchanged
        self.exclude = set(exclude)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        query = [f"base_model={self.base_model}"] if self.base_model else []
        query += [] if skip_unchanged else ["skip_unchanged=false"]
        query += [f"endpoint={endpoint}"] if endpoint else []
        repos_part = ",".join(
            HubRef(r, None if b == "main" else b).uri()[5:] for r, b in self.watch
        )
        self.uri = f"{SCHEME}{repos_part}" + (f"?{'&'.join(query)}" if query else "")

    @classmethod
    def from_uri(cls, uri: str) -> HubSource:
        """Build a source from ``hf://[org/repo[@branch][,org/other…]][?base_model=org/base]``.

        Query options: ``base_model`` (discover fine-tunes), ``endpoint`` (else
        ``HF_ENDPOINT``), ``skip_unchanged=false`` (list commits that did not change the
        weights too). ``hf://org/repo`` watches one repo's ``main``;
        ``hf://?base_model=org/base`` only discovers.
        """
        parts = urlsplit(uri)
        if parts.scheme != "hf":
            raise ConfigError(
                f"bad Hub source {uri!r}: expected hf://org/repo or hf://?base_model=org/base"
            )
        query = parse_qs(parts.query)
        unknown = set(query) - {"base_model", "endpoint", "skip_unchanged"}
        if unknown:
            raise ConfigError(
                f"bad Hub source {uri!r}: unknown option(s) {', '.join(sorted(unknown))}"
            )
        spec = f"{parts.netloc}{parts.path}"
        repos = [r for r in spec.split(",") if r]
        skip = query.get("skip_unchanged", ["true"])[-1].lower() not in ("0", "false", "no")
        return cls(
            repos,
            base_model=query.get("base_model", [None])[-1],
            endpoint=query.get("endpoint", [None])[-1],
            skip_unchanged=skip,
        )

    def __repr__(self) -> str:
        return f"HubSource({self.uri!r})"

    def _repo_at(self, repo_id: str, sha: str, label: str) -> HubRepo:
        try:
            return HubRepo(repo_id, sha, endpoint=self.endpoint, token=self.token, api=self.api)
        except CheckpointError as e:
            raise ConfigError(f"Hub source: {label}: {e.problem}") from None

    def _checkpoint(self, repo: HubRepo, published_at: datetime) -> PublishedCheckpoint:
        if published_at.tzinfo is None:
            published_at = published_at.replace(tzinfo=timezone.utc)
        return PublishedCheckpoint(
            id=repo.uri, uri=repo.uri, digest=repo.content_digest(), published_at=published_at
        )

    def _watched(self, repo_id: str, branch: str) -> list[PublishedCheckpoint]:
        label = HubRef(repo_id, branch).uri()
        with _hub_errors(label, ConfigError):
            commits = self.api.list_repo_commits(repo_id, revision=branch)
        out: list[PublishedCheckpoint] = []
        last_digest = None
        for c in sorted(commits, key=lambda c: (c.created_at, c.commit_id)):
            repo = self._repo_at(repo_id, c.commit_id, label)
            if not repo.has_weights():
                continue
            digest = repo.content_digest()
            if self.skip_unchanged and digest == last_digest:
                continue
            last_digest = digest
            out.append(self._checkpoint(repo, c.created_at))
        return out

    def _discovered(self, watched: set[str]) -> list[PublishedCheckpoint]:
        assert self.base_model is not None
        label = f"fine-tunes of {self.base_model}"
        with _hub_errors(label, ConfigError):
            found = list(
                self.api.list_models(filter=f"base_model:{self.base_model}", cardData=True)
            )
        out: list[PublishedCheckpoint] = []
        for m in found:
            if m.id in watched or m.id == self.base_model or m.id in self.exclude:
                continue
            if m.card_data is not None and self.base_model not in _base_models(
                _card_dict(m.card_data)
            ):
                continue
            try:
                repo = HubRepo(m.id, None, endpoint=self.endpoint, token=self.token, api=self.api)
            except CheckpointError:
                continue  # deleted or made private since the search: not published any more
            if self.base_model not in _base_models(repo.card_data) or not repo.has_weights():
                continue
            when = repo.last_modified
            if when is None:
                with _hub_errors(repo.uri, ConfigError):
                    when = self.api.list_repo_commits(m.id, revision=repo.sha)[0].created_at
            out.append(self._checkpoint(repo, when))
        return out

    def list(self) -> list[PublishedCheckpoint]:
        """Every published checkpoint, oldest first (by publication time, then id)."""
        found: dict[str, PublishedCheckpoint] = {}
        for repo_id, branch in self.watch:
            if repo_id in self.exclude:
                continue
            for cp in self._watched(repo_id, branch):
                found.setdefault(cp.id, cp)
        if self.base_model:
            for cp in self._discovered({r for r, _ in self.watch}):
                found.setdefault(cp.id, cp)
        return sorted(found.values(), key=lambda cp: (cp.published_at, cp.id))
