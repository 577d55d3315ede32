"""A local stand-in for the Hugging Face Hub HTTP API, for tests.

The public Hub cannot be reached from CI, so the real ``huggingface_hub`` client is
pointed at this server (``HfApi(endpoint=hub.endpoint)``). It serves fake model repos
with a git-like commit history and answers exactly the endpoints mergeflow uses:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``model_info``,
  siblings with sizes/LFS info when ``blobs=True``, card data from README.md front matter);
- ``GET /api/models?filter=..&author=..&search=..`` (``list_models``);
- ``GET /api/models/{repo}/commits/{rev}`` (``list_repo_commits``, newest first);
- ``HEAD/GET /{repo}/resolve/{rev}/{path}``: small files are served directly, LFS files
  (``*.safetensors``, ``*.bin``) redirect like the Hub does to ``/cdn-lfs/{sha256}``, which
  honours ``Range``. Headers: ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size``.

Writes (``create_repo``, ``upload_folder``: preupload, LFS batch and upload, the NDJSON
commit) are answered by :mod:`helpers.hub_writes`.

Every request is recorded in :attr:`HubStandIn.requests` so tests can assert that no
weight file was downloaded whole. Errors use the Hub's ``X-Error-Code`` header so the
client raises ``RepositoryNotFoundError``/``RevisionNotFoundError``/``EntryNotFoundError``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from helpers.hub_writes import LFS_SUFFIXES, handle_write


@dataclass(frozen=True)
class Blob:
    """One stored file version."""

    sha256: str
    git_sha1: str
    size: int


@dataclass
class Commit:
    """One commit: the full tree (path -> blob) after it."""

    sha: str
    parent: str | None
    title: str
    date: datetime
    author: str
    tree: dict[str, Blob]


@dataclass
class FakeRepo:
    """A model repo: its commits in order and its branches."""

    repo_id: str
    created_at: datetime
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the stand-in answered."""

    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    authorization: str | None


class HubStandIn:
    """A Hub stand-in on 127.0.0.1 serving repos kept under ``root``.

    Use as a context manager; ``endpoint`` is the URL to give ``HfApi``/mergeflow.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.ignore_ranges = False
        """When set, byte ranges are ignored (a misbehaving server/proxy) to test the client's guard."""
        self.write_token: str | None = None
        """When set, writes need ``Authorization: Bearer <write_token>``."""
        self._lock = threading.Lock()
        self._clock = datetime(2025, 1, 1, tzinfo=timezone.utc)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repo management (test side) -------------------------------------------------
    def _tick(self) -> datetime:
        self._clock += timedelta(minutes=1)
        return self._clock

    def _store_blob(self, data: bytes) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        path = self.root / "blobs" / sha256
        if not path.exists():
            path.write_bytes(data)
        return Blob(sha256, git_sha1, len(data))

    def create_repo(self, repo_id: str) -> None:
        """Create an empty repo with the Hub's initial ``.gitattributes`` commit."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"repo {repo_id} exists")
            self.repos[repo_id] = FakeRepo(repo_id, self._clock + timedelta(seconds=1))
        self.commit(
            repo_id,
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
            "initial commit",
            author="system",
        )

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        title: str = "upload",
        *,
        delete: tuple[str, ...] = (),
        branch: str = "main",
        author: str = "tester",
        date: datetime | None = None,
    ) -> str:
        """Commit ``files`` (path -> bytes or local file) on ``branch``; returns the commit sha."""
        with self._lock:
            repo = self.repos[repo_id]
            parent_sha = repo.refs.get(branch)
            parent = next((c for c in repo.commits if c.sha == parent_sha), None)
            tree = dict(parent.tree) if parent else {}
            for p in delete:
                tree.pop(p, None)
            for p, content in files.items():
                data = content.read_bytes() if isinstance(content, Path) else content
                tree[p] = self._store_blob(data)
            when = date or self._tick()
            h = hashlib.sha1()
            h.update(f"{repo_id}\n{parent_sha}\n{title}\n{when.isoformat()}\n".encode())
            for p in sorted(tree):
                h.update(f"{p}:{tree[p].git_sha1}\n".encode())
            sha = h.hexdigest()
            repo.commits.append(Commit(sha, parent_sha, title, when, author, tree))
            repo.refs[branch] = sha
            return sha

    def upload_folder(
        self, repo_id: str, folder: Path, title: str = "upload folder", **kw: Any
    ) -> str:
        """Commit every file under ``folder`` (relative paths kept)."""
        files: dict[str, bytes | Path] = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.commit(repo_id, files, title, **kw)

    def weight_requests(self) -> list[RecordedRequest]:
        """Requests that returned LFS (weight) bytes."""
        return [r for r in self.requests if r.path.startswith("/cdn-lfs/") and r.method == "GET"]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- lookups (server side) -------------------------------------------------------
    def _resolve(self, repo: FakeRepo, rev: str) -> Commit | None:
        sha = repo.refs.get(rev, rev)
        return next((c for c in repo.commits if c.sha == sha), None)

    def _history(self, repo: FakeRepo, head: Commit) -> list[Commit]:
        by_sha = {c.sha: c for c in repo.commits}
        out, cur = [], head
        while cur is not None:
            out.append(cur)
            cur = by_sha.get(cur.parent) if cur.parent else None
        return out

    @staticmethod
    def _card_data(commit: Commit, root: Path) -> dict[str, Any] | None:
        blob = commit.tree.get("README.md")
        if blob is None:
            return None
        text = (root / "blobs" / blob.sha256).read_text()
        m = re.match(r"^---\n(.*?)\n---", text, re.S)
        if not m:
            return None
        data = yaml.safe_load(m.group(1))
        return data if isinstance(data, dict) else None

    def _model_json(
        self,
        repo: FakeRepo,
        commit: Commit,
        *,
        blobs: bool,
        card: bool = True,
        siblings: bool = True,
    ) -> dict[str, Any]:
        main = self._resolve(repo, "main") or commit
        card_data = self._card_data(commit, self.root)
        tags: list[str] = []
        if card_data:
            bases = card_data.get("base_model")
            for b in [bases] if isinstance(bases, str) else (bases or []):
                tags += [f"base_model:{b}", f"base_model:finetune:{b}"]
            tags += [str(t) for t in card_data.get("tags") or []]
        out: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": main.date.isoformat().replace("+00:00", ".000Z"),
            "createdAt": repo.created_at.isoformat().replace("+00:00", ".000Z"),
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": tags,
            "downloads": 0,
            "likes": 0,
        }
        if card and card_data is not None:
            out["cardData"] = card_data
        if siblings:
            sibs = []
            for p in sorted(commit.tree):
                b = commit.tree[p]
                s: dict[str, Any] = {"rfilename": p}
                if blobs:
                    s["size"] = b.size
                    s["blobId"] = b.git_sha1
                    if p.endswith(LFS_SUFFIXES):
                        s["lfs"] = {"sha256": b.sha256, "size": b.size, "pointerSize": 134}
                sibs.append(s)
            out["siblings"] = sibs
        return out

    # -- server lifecycle ------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "stand-in not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_MODEL_RE = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|commits)/(?P<rev>[^/]+))?/?$"
)
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN_RE = re.compile(r"^/cdn-lfs/(?P<sha>[0-9a-f]{64})$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------
    def _record(self, status: int, nbytes: int) -> None:
        with self.hub._lock:
            self.hub.requests.append(
                RecordedRequest(
                    self.command,
                    self.path,
                    self.headers.get("Range"),
                    status,
                    nbytes,
                    self.headers.get("Authorization"),
                )
            )

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._record(
            status, 0 if self.command == "HEAD" else len(body)
        )  # before the client can see it
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(
            status,
            json.dumps({"error": message}).encode(),
            {"X-Error-Code": code, "X-Error-Message": message},
        )

    # -- dispatch --------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        handle_write(self)

    def do_PUT(self) -> None:
        handle_write(self)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        try:
            if path == "/api/models":
                return self._list_models(query)
            if m := _MODEL_RE.match(url.path):
                return self._model(
                    unquote(m["repo"]), m["op"], unquote(m["rev"]) if m["rev"] else None, query
                )
            if m := _RESOLVE_RE.match(url.path):
                return self._resolve_file(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]))
            if m := _CDN_RE.match(path):
                return self._cdn(m["sha"], query.get("commit", [""])[0])
            self._error(404, "NotFound", f"no route for {path}")
        except Exception as e:  # pragma: no cover - surfaced to the client as a 500
            self._send(500, json.dumps({"error": repr(e)}).encode())

    def _repo_commit(self, repo_id: str, rev: str) -> tuple[FakeRepo, Commit] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = self.hub._resolve(repo, rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    def _model(
        self, repo_id: str, op: str | None, rev: str | None, query: dict[str, list[str]]
    ) -> None:
        found = self._repo_commit(repo_id, rev or "main")
        if found is None:
            return
        repo, commit = found
        if op == "commits":
            items = [
                {
                    "id": c.sha,
                    "title": c.title,
                    "message": "",
                    "date": c.date.isoformat().replace("+00:00", ".000Z"),
                    "authors": [{"user": c.author}],
                }
                for c in self.hub._history(repo, commit)
            ]
            return self._json(items)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        self._json(self.hub._model_json(repo, commit, blobs=blobs))

    def _list_models(self, query: dict[str, list[str]]) -> None:
        filters = query.get("filter", [])
        author = query.get("author", [None])[0]
        search = query.get("search", [None])[0]
        out = []
        for repo in sorted(self.hub.repos.values(), key=lambda r: r.repo_id):
            head = self.hub._resolve(repo, "main")
            if head is None:
                continue
            info = self.hub._model_json(
                repo,
                head,
                blobs=False,
                card="cardData" in query or "full" in query,
                siblings="full" in query,
            )
            if author and not repo.repo_id.startswith(f"{author}/"):
                continue
            if search and search.lower() not in repo.repo_id.lower():
                continue
            if not all(f in info["tags"] for f in filters):
                continue
            out.append(info)
        self._json(out)

    def _resolve_file(self, repo_id: str, rev: str, path: str) -> None:
        found = self._repo_commit(repo_id, rev)
        if found is None:
            return
        _, commit = found
        blob = commit.tree.get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if path.endswith(LFS_SUFFIXES):
            # Like the Hub: LFS files redirect to a content-addressed CDN URL.
            headers |= {
                "Location": f"/cdn-lfs/{blob.sha256}?commit={commit.sha}",
                "ETag": f'"{blob.git_sha1}"',
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(blob.size),
            }
            return self._send(302, b"", headers, "text/plain")
        headers["ETag"] = f'"{blob.git_sha1}"'
        self._serve_bytes(self.hub.root / "blobs" / blob.sha256, blob.size, headers)

    def _cdn(self, sha: str, commit: str) -> None:
        p = self.hub.root / "blobs" / sha
        if not p.exists():
            return self._error(404, "EntryNotFound", "no such object")
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if commit:  # huggingface_hub follows a same-host redirect and reads the commit here
            headers["X-Repo-Commit"] = commit
        self._serve_bytes(p, p.stat().st_size, headers)

    def _serve_bytes(self, path: Path, size: int, headers: dict[str, str]) -> None:
        rng = None if self.hub.ignore_ranges else self.headers.get("Range")
        start, end = 0, size - 1
        status = 200
        if rng:
            m = _RANGE_RE.match(rng.strip())
            if not m or (not m[1] and not m[2]):
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            if m[1]:
                start = int(m[1])
                end = min(int(m[2]), size - 1) if m[2] else size - 1
            else:
                start = max(0, size - int(m[2]))
            if start >= size or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{size}"}
        body = b""
        if self.command != "HEAD":
            with open(path, "rb") as fh:
                fh.seek(start)
                body = fh.read(end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        for k, v in headers.items():
            self.send_header(k, v)
        self._record(status, len(body))
        self.end_headers()
        if body:
            self.wfile.write(body)
