"""StoreSource on a local folder and on S3 (real SeaweedFS server): completeness, order, digests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from mergeflow.errors import ConfigError
from mergeflow.storage.objects import LocalStore, ObjectStore
from mergeflow.storage.s3 import S3Store
from mergeflow.storage.schemes import open_source
from mergeflow.storage.sources import CheckpointRef, Source, StoreSource


def blob(seed: int, n: int = 2) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save(
        {f"layer.{i}.weight": torch.randn(64, 32, generator=g) for i in range(n)},
        metadata={"format": "pt"},
    )


def shard(seed: int, keys: list[str]) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({k: torch.randn(64, 32, generator=g) for k in keys})


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "published")
    loc = request.getfixturevalue("s3_bucket")
    return S3Store.from_uri(loc.uri)


def tick(store: ObjectStore) -> None:
    """Let the clock move past the store's mtime resolution (S3 LastModified: 1 s)."""
    time.sleep(1.05 if isinstance(store, S3Store) else 0.02)


def ids(src: Source) -> list[str]:
    return [c.id for c in src.list()]


def test_completeness_order_and_digests(store: ObjectStore) -> None:
    src = StoreSource(store)
    assert src.list() == []

    # A single-file checkpoint with a config.
    store.write_bytes("zeta/config.json", b'{"model_type": "toy"}')
    store.write_bytes("zeta/model.safetensors", blob(1))
    assert ids(src) == ["zeta"]

    # A sharded checkpoint uploaded index-first: invisible until every shard is whole.
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    store.write_bytes("alpha/model.safetensors.index.json", json.dumps(index).encode())
    assert ids(src) == ["zeta"]
    store.write_bytes("alpha/model-00001-of-00002.safetensors", shard(2, ["a"]))
    assert ids(src) == ["zeta"]
    full2 = shard(3, ["b"])
    store.write_bytes("alpha/model-00002-of-00002.safetensors", full2[:-16])  # short shard
    assert ids(src) == ["zeta"]
    store.write_bytes("alpha/model-00002-of-00002.safetensors", full2[:5])  # header incomplete
    assert ids(src) == ["zeta"]
    tick(store)
    store.write_bytes("alpha/model-00002-of-00002.safetensors", full2)
    listed = src.list()
    # Publication order: alpha completed after zeta, although "alpha" < "zeta".
    assert [c.id for c in listed] == ["zeta", "alpha"]
    assert listed[0].published_at <= listed[1].published_at
    assert listed[1].uri == f"{store.uri}/alpha"
    assert all(isinstance(c, CheckpointRef) and c.digest.startswith("sha256:") for c in listed)
    assert len({c.digest for c in listed}) == 2

    # Stable: a fresh source over the same objects gives the same ids, digests, times.
    assert StoreSource(store).list() == listed

    # More layouts: a PEFT adapter, a bare top-level file, and things that never count.
    tick(store)
    store.write_bytes(
        "lora/adapter_config.json", b'{"r": 4, "lora_alpha": 8, "target_modules": ["q"]}'
    )
    store.write_bytes("lora/adapter_model.safetensors", blob(4))
    store.write_bytes("bare.safetensors", blob(5))
    store.write_bytes("half.safetensors", blob(6)[:-8])
    store.write_bytes("configonly/config.json", b"{}")
    store.write_bytes(
        "corrupt/model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 8
    )
    store.write_bytes("badindex/model.safetensors.index.json", b"{not json")
    store.write_bytes(
        "dangling/model.safetensors.index.json",
        json.dumps({"weight_map": {"x": "nope.safetensors"}}).encode(),
    )
    store.write_bytes(".hidden/model.safetensors", blob(7))
    store.write_bytes("deep/sub/model.safetensors", blob(8))
    after = src.list()
    assert [c.id for c in after[:2]] == ["zeta", "alpha"]
    assert sorted(c.id for c in after[2:]) == ["bare.safetensors", "lora"]
    assert after == sorted(after, key=lambda c: (c.published_at, c.id))
    assert after[:2] == listed

    # Changing a weight file changes the digest; the id stays.
    tick(store)
    store.write_bytes("zeta/model.safetensors", blob(9))
    changed = {c.id: c for c in src.list()}
    assert changed["zeta"].digest != listed[0].digest
    assert changed["alpha"].digest == listed[1].digest
    # Touching only a file outside the checkpoint's files leaves the digest alone.
    store.write_bytes("zeta/README.md", b"hello")
    assert {c.id: c.digest for c in src.list()} == {c.id: c.digest for c in changed.values()}


@pytest.mark.services
def test_s3_digest_is_content_derived_and_listing_is_cached(s3_bucket: Any) -> None:
    client = s3_bucket.client()
    gets: list[str] = []
    client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: gets.append(request.url)
    )
    store = S3Store.from_uri(s3_bucket.uri, client=client)
    store.write_bytes("c1/model.safetensors", blob(1))
    store.write_bytes("c1/config.json", b"{}")
    src = StoreSource(store)
    first = src.list()
    assert len(gets) == 1  # one header probe for the one weight file
    assert src.list() == first and len(gets) == 1  # unchanged objects: LIST only
    # Same bytes uploaded again: same etag, so the same digest (LastModified moves on).
    tick(store)
    store.write_bytes("c1/model.safetensors", blob(1))
    again = StoreSource(store).list()
    assert again[0].digest == first[0].digest
    assert again[0].published_at > first[0].published_at


def test_local_file_written_in_place_counts_once_whole(tmp_path: Path) -> None:
    folder = tmp_path / "pub"
    (folder / "run1").mkdir(parents=True)
    data = blob(1)
    target = folder / "run1" / "model.safetensors"
    with open(target, "wb") as fh:  # a slow, non-atomic copy
        fh.write(data[: len(data) // 2])
        fh.flush()
        assert open_source(str(folder)).list() == []
        fh.write(data[len(data) // 2 :])
    (ck,) = open_source(f"file://{folder}").list()
    assert ck.id == "run1" and ck.uri == f"{folder}/run1"


@pytest.mark.services
def test_open_source_dispatch(
    s3_bucket: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = open_source(str(tmp_path))
    assert isinstance(local, StoreSource) and isinstance(local.store, LocalStore)
    s3 = open_source(s3_bucket.uri)
    assert isinstance(s3, StoreSource) and isinstance(s3.store, S3Store) and s3.uri == s3_bucket.uri
    with pytest.raises(ConfigError, match="unsupported checkpoint source 'ftp://x/y'"):
        open_source("ftp://x/y")
    from mergeflow.storage.hub import HubSource
    from mergeflow.storage.registry import MlflowSource

    assert isinstance(open_source("hf://org/repo"), HubSource)
    assert isinstance(open_source("mlflow://models/upstream"), MlflowSource)
