"""The local digest cache: hits only for unchanged files, never for racy ones, off by setting."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.storage import digest_cache
from mergeflow.storage.digest_cache import cached_digest
from mergeflow.storage.schemes import open_checkpoint


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MERGEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MERGEFLOW_DIGEST_CACHE", raising=False)
    return tmp_path / "home"


def _counting(value: str) -> tuple[list[int], object]:
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return value

    return calls, compute


def test_an_unchanged_file_is_hashed_once_and_a_rewritten_one_again(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_cache, "RACY_S", 0.0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    calls, compute = _counting("sha256:one")
    assert cached_digest([f], compute) == "sha256:one"
    assert cached_digest([f], compute) == "sha256:one"
    assert len(calls) == 1 and len(list((home / "cache" / "digests").iterdir())) == 1
    f.write_bytes(b"b" * 100)  # same size, new content: its times change
    calls2, compute2 = _counting("sha256:two")
    assert cached_digest([f], compute2) == "sha256:two" and len(calls2) == 1
    entries = home / "cache" / "digests"
    assert len(list(entries.iterdir())) == 1  # the old content's entry was pruned
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # a touch keeping mtime changes ctime
    calls3, compute3 = _counting("sha256:three")
    assert cached_digest([f], compute3) == "sha256:three" and len(calls3) == 1
    assert len(list(entries.iterdir())) == 1


def test_entries_of_deleted_files_are_pruned_by_the_next_new_entry(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_cache, "RACY_S", 0.0)
    gone, kept, new = (tmp_path / f"{n}.safetensors" for n in ("gone", "kept", "new"))
    for f in (gone, kept, new):
        f.write_bytes(f.name.encode())
    cached_digest([gone], lambda: "sha256:gone")
    cached_digest([kept], lambda: "sha256:kept")
    entries = home / "cache" / "digests"
    assert len(list(entries.iterdir())) == 2
    gone.unlink()
    cached_digest([new], lambda: "sha256:new")
    kept_files = sorted(json.loads(e.read_text())["files"][0] for e in entries.iterdir())
    assert kept_files == [str(kept.resolve()), str(new.resolve())]
    assert cached_digest([kept], lambda: "sha256:other") == "sha256:kept"


def test_a_file_modified_just_before_hashing_is_not_cached(home: Path, tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    calls, compute = _counting("sha256:x")
    cached_digest([f], compute)
    cached_digest([f], compute)
    assert len(calls) == 2 and not (home / "cache" / "digests").exists()


def test_the_cache_can_be_turned_off_and_a_broken_entry_costs_a_hash(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_cache, "RACY_S", 0.0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a")
    monkeypatch.setenv("MERGEFLOW_DIGEST_CACHE", "false")
    calls, compute = _counting("sha256:x")
    cached_digest([f], compute)
    cached_digest([f], compute)
    assert len(calls) == 2 and not (home / "cache").exists()
    monkeypatch.delenv("MERGEFLOW_DIGEST_CACHE")
    cached_digest([f], compute)
    (entry,) = (home / "cache" / "digests").iterdir()
    entry.write_text("{not json")
    assert cached_digest([f], compute) == "sha256:x" and len(calls) == 4


def test_a_checkpoints_digest_is_the_sha256_of_its_bytes_cached_or_not(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digest_cache, "RACY_S", 0.0)
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "model.safetensors"))
    want = "sha256:" + hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert open_checkpoint(str(d)).digest() == want  # computed
    assert open_checkpoint(str(d)).digest() == want  # from the cache
    save_file({"w": torch.zeros(2, 3)}, str(d / "model.safetensors"))
    new = "sha256:" + hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert new != want and open_checkpoint(str(d)).digest() == new
