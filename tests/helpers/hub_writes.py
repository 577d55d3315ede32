"""The write half of the Hub stand-in: the calls ``HfApi.create_repo`` and ``upload_folder`` make.

Served by :class:`helpers.hub_standin.HubStandIn` (``do_POST``/``do_PUT`` delegate here), over
the LFS upload protocol (``huggingface_hub`` with ``HF_HUB_DISABLE_XET=1``; the Xet protocol
needs a CAS server the stand-in does not emulate):

- ``POST /api/repos/create`` (409 when the repo exists, as the Hub answers);
- ``POST /api/validate-yaml`` (the card's metadata must be a YAML mapping);
- ``POST /api/models/{repo}/preupload/{rev}``: ``lfs`` for weight files, ``regular`` otherwise;
- ``POST /{repo}.git/info/lfs/objects/batch`` then ``PUT /lfs-upload/{sha256}`` (checked);
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (``file``, ``lfsFile``,
  ``deletedFile``), applied as ONE commit of the stand-in's history.

When ``hub.write_token`` is set, every write needs ``Authorization: Bearer <token>`` (401
otherwise), except the LFS upload itself, which, like the Hub's pre-signed storage URL, carries
a signature in its query instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import yaml

if TYPE_CHECKING:
    from helpers.hub_standin import _Handler

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")
_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")


def read_body(h: _Handler) -> bytes:
    """The request body (Content-Length or chunked)."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().strip() or b"0", 16)
            if size == 0:
                h.rfile.readline()
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def handle_write(h: _Handler) -> None:
    """Answer one POST or PUT (see the module docstring); a failure answers 500."""
    try:
        _route(h)
    except Exception as e:  # surfaced to the client
        h._send(500, json.dumps({"error": repr(e)}).encode())


def _signature(h: _Handler, oid: str) -> str:
    return hashlib.sha256(f"{h.hub.write_token}:{oid}".encode()).hexdigest()[:32]


def _route(h: _Handler) -> None:
    hub = h.hub
    url = urlsplit(h.path)
    path = unquote(url.path)
    body = read_body(h)
    if m := _UPLOAD.match(path):
        if url.query != f"sig={_signature(h, m['oid'])}":
            return h._error(403, "Forbidden", "bad upload signature")
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            return h._error(400, "BadRequest", "sha256 of the upload does not match its oid")
        hub._store_blob(body)
        return h._json({})
    if hub.write_token and h.headers.get("Authorization") != f"Bearer {hub.write_token}":
        return h._error(401, "Unauthorized", "Invalid credentials in Authorization header")
    if path == "/api/repos/create":
        return _create_repo(h, json.loads(body))
    if path == "/api/validate-yaml":
        return _validate_yaml(h, json.loads(body))
    if m := _PREUPLOAD.match(path):
        if m["repo"] not in hub.repos:
            return h._error(404, "RepoNotFound", "Repository not found")
        files = json.loads(body)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        return h._json({"files": modes})
    if m := _BATCH.match(path):
        return _lfs_batch(h, json.loads(body))
    if m := _COMMIT.match(path):
        return _commit(h, m["repo"], m["rev"], body)
    h._error(404, "NotFound", f"no route for {h.command} {path}")


def _create_repo(h: _Handler, doc: dict[str, Any]) -> None:
    if doc.get("type") not in (None, "model"):
        return h._error(400, "BadRequest", "the stand-in only hosts model repos")
    repo_id = f"{doc.get('organization') or 'tester'}/{doc['name']}"
    url = f"{h.hub.endpoint}/{repo_id}"
    if repo_id in h.hub.repos:
        return h._json({"error": "You already created this model repo", "url": url}, 409)
    h.hub.create_repo(repo_id)
    h._json({"url": url, "name": repo_id})


def _validate_yaml(h: _Handler, doc: dict[str, Any]) -> None:
    m = re.match(r"^---\n(.*?)\n---", doc.get("content", ""), re.S)
    try:
        meta = yaml.safe_load(m.group(1)) if m else {}
    except yaml.YAMLError as e:
        return h._json({"error": f"invalid YAML: {e}"}, 400)
    if not isinstance(meta, dict):
        return h._json({"error": "the metadata must be a YAML mapping"}, 400)
    h._json({"errors": [], "warnings": []})


def _lfs_batch(h: _Handler, doc: dict[str, Any]) -> None:
    objects = []
    for o in doc.get("objects", []):
        item: dict[str, Any] = {"oid": o["oid"], "size": o["size"]}
        if not (h.hub.root / "blobs" / o["oid"]).exists():
            href = f"{h.hub.endpoint}/lfs-upload/{o['oid']}?sig={_signature(h, o['oid'])}"
            item["actions"] = {"upload": {"href": href}}
        objects.append(item)
    h._json({"transfer": "basic", "objects": objects})


def _commit(h: _Handler, repo_id: str, rev: str, body: bytes) -> None:
    if repo_id not in h.hub.repos:
        return h._error(404, "RepoNotFound", "Repository not found")
    title, files, delete = "", {}, []
    for line in body.decode().splitlines():
        item = json.loads(line)
        key, value = item["key"], item["value"]
        if key == "header":
            title = value["summary"]
        elif key == "file":
            files[value["path"]] = base64.b64decode(value["content"])
        elif key == "lfsFile":
            blob = h.hub.root / "blobs" / value["oid"]
            if not blob.exists():
                return h._error(400, "BadRequest", f"LFS object {value['oid']} was not uploaded")
            files[value["path"]] = blob.read_bytes()
        elif key in ("deletedFile", "deletedFolder"):
            delete.append(value["path"])
    sha = h.hub.commit(repo_id, files, title, delete=tuple(delete), branch=rev)
    h._json(
        {"commitUrl": f"{h.hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}
    )
