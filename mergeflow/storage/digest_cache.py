"""Digests of local weight files, cached by the files' identity, as git's index caches hashes.

A local checkpoint's digest is the sha256 of its weight files' bytes, so every fold would
read a 7B base again only to check it is the state's. This cache keys a digest by what the
kernel reports for each file: device, inode, size, and modification and change times in
nanoseconds. Rewriting, replacing or touching a file changes them (a user cannot set the
change time back), so the digest is computed again. A file modified less than
:data:`RACY_S` before it was hashed is not cached: on a filesystem with coarse timestamps a
second write in the same tick could keep every field (git's "racy" rule).

One small JSON file per key under ``<MERGEFLOW_HOME>/cache/digests/``, written atomically; a
cache that cannot be read or written only costs the hash. Each new entry prunes the entries
whose files were since deleted or changed (they can never hit again), so the cache holds one
entry per checkpoint as it is now. ``MERGEFLOW_DIGEST_CACHE=false`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mergeflow.settings import Settings

RACY_S = 2.0
"""A file modified this recently (seconds) when hashed is not cached."""


def _identity(paths: Sequence[Path]) -> tuple[str, float] | None:
    """A key for the files' identities, and their newest modification time (None if one is missing)."""
    parts, newest = [], 0.0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        parts.append(
            f"{p.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        )
        newest = max(newest, st.st_mtime, st.st_ctime)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest(), newest


def cached_digest(paths: Sequence[Path], compute: Callable[[], str]) -> str:
    """``compute()`` for the files ``paths``, or the digest cached for their identity."""
    settings = Settings()
    ident = _identity(paths) if settings.digest_cache else None
    if ident is None:
        return compute()
    key, newest = ident
    entry = settings.home / "cache" / "digests" / f"{key}.json"
    try:
        hit = json.loads(entry.read_text()).get("digest")
        if isinstance(hit, str) and hit.startswith("sha256:"):
            return hit
    except (OSError, ValueError, AttributeError):
        pass
    started = time.time()
    digest = compute()
    if started - newest < RACY_S or _identity(paths) != ident:  # racy, or changed meanwhile
        return digest
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"digest": digest, "files": [str(p) for p in paths]}))
        os.replace(tmp, entry)
    except OSError:
        return digest
    _prune(entry.parent)
    return digest


def _prune(folder: Path) -> None:
    """Remove the entries whose files are gone or changed (their key is no longer theirs)."""
    for entry in folder.glob("*.json"):
        try:
            files = json.loads(entry.read_text())["files"]
            ident = _identity([Path(f) for f in files])
            if ident is None or ident[0] != entry.stem:
                entry.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
