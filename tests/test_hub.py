"""Hub support through the real huggingface_hub client, against a local stand-in server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.hub_standin import HubStandIn
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.storage.hub import HubRef, HubSource, open_hub_store
from mergeflow.storage.objects import ObjectStore, ReadOnlyStore
from mergeflow.storage.safetensors_file import SafetensorsReader
from mergeflow.storage.schemes import open_checkpoint, open_source, open_store
from mergeflow.storage.shard_writer import ShardedWriter
from mergeflow.storage.sources import Source

CARD = "---\nbase_model: {base}\nlicense: mit\n---\n# A fine-tune\n"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # read once at import
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with HubStandIn(tmp_path / "hub") as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin


def tensors(seed: int, big: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "layer.weight": torch.randn(
            600 if big else 6, 600, generator=g
        ),  # > 1 MiB: past the header prefix
        "layer.bias": torch.randn(600, generator=g).to(torch.float16),
        "emb": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "steps": torch.arange(5, dtype=torch.int64),
    }
    return out


def st_bytes(tmp_path: Path, ts: dict[str, torch.Tensor], name: str = "w.safetensors") -> Path:
    p = tmp_path / name
    save_file(ts, str(p))
    return p


def assert_same(reader: SafetensorsReader, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.keys()) == sorted(expected)
    for k, v in expected.items():
        got = reader.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_single_file_read_with_one_ranged_request_per_tensor(
    hub: HubStandIn, tmp_path: Path
) -> None:
    ts = tensors(0)
    hub.create_repo("org/ft")
    sha = hub.commit(
        "org/ft", {"config.json": b'{"hidden": 600}', "model.safetensors": st_bytes(tmp_path, ts)}
    )
    size = (tmp_path / "w.safetensors").stat().st_size
    hub.clear_requests()

    store = open_hub_store("hf://org/ft")  # endpoint from HF_ENDPOINT, revision main -> sha
    assert store.uri == f"hf://org/ft@{sha}"
    assert json.loads(store.read_bytes("config.json")) == {"hidden": 600}
    src = store.byte_source("model.safetensors")
    assert src.name == f"hf://org/ft@{sha}/model.safetensors" and src.size() == size
    reader = SafetensorsReader(src)
    header_reqs = hub.weight_requests()
    assert len(header_reqs) == 1 and header_reqs[0].range == f"bytes=0-{(1 << 20) - 1}"
    assert_same(reader, ts)

    weight = hub.weight_requests()
    assert len(weight) == 1 + len(ts)  # header, then one request per tensor
    assert all(r.range and r.status == 206 for r in weight)
    assert all(r.body_bytes < size for r in weight)  # never the whole file
    spans = sorted(
        int(m[2]) - int(m[1]) + 1
        for r in weight[1:]
        if (m := re.match(r"bytes=(\d+)-(\d+)", r.range or ""))
    )
    assert spans == sorted(t.numel() * t.element_size() for t in ts.values())
    # Every file request names the pinned sha, never the branch.
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{sha}/" in r.path for r in resolves)


def test_sharded_repo_and_store_listing(hub: HubStandIn, tmp_path: Path) -> None:
    ts = tensors(1, big=False)

    class Sink:
        def put(self, local_path: Path, name: str) -> None:
            (tmp_path / "out").mkdir(exist_ok=True)
            (tmp_path / "out" / name).write_bytes(local_path.read_bytes())

    w = ShardedWriter(Sink(), max_shard_size=2000)
    for k, v in ts.items():
        w.add(k, v)
    names = w.commit()
    assert len(names) > 1
    hub.create_repo("org/sharded")
    hub.commit("org/sharded", {f"ckpt/{p.name}": p for p in (tmp_path / "out").iterdir()})

    store = open_hub_store("hf://org/sharded@main/ckpt", endpoint=hub.endpoint)
    assert store.uri.endswith("/ckpt") and store.has_weights()
    listed = {o.relpath: o for o in store.list()}
    assert set(listed) == {*names, "model.safetensors.index.json"}
    assert all(o.size > 0 and o.etag for o in listed.values())
    assert store.exists("model.safetensors.index.json") and not store.exists("model.safetensors")
    assert [o.relpath for o in store.list(names[0])] == [names[0]]
    with pytest.raises(ConfigError):
        store.child("../escape")

    index = json.loads(store.read_bytes("model.safetensors.index.json"))
    by_shard: dict[str, list[str]] = {}
    for k, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(k)
    for shard, keys in by_shard.items():
        reader = SafetensorsReader(store.byte_source(shard))
        assert_same(reader, {k: ts[k] for k in keys})
    assert sorted(index["weight_map"]) == sorted(ts)

    # The lead's checkpoint opener treats the Hub folder like any other store.
    ck = open_checkpoint("hf://org/sharded/ckpt")
    assert sorted(ck.reader.keys()) == sorted(ts)
    assert torch.equal(ck.reader.get("layer.weight"), ts["layer.weight"])
    assert ck.digest() == store.content_digest()
    assert store.repo.weight_files("ckpt") == ["model.safetensors.index.json", *sorted(names)]

    # A Hub store is read-only by type, and the writable opener refuses the Hub.
    assert isinstance(store, ReadOnlyStore) and not isinstance(store, ObjectStore)
    with pytest.raises(ConfigError, match="is read-only: mergeflow never writes to hf://"):
        open_store(store.uri)


def test_reads_stay_pinned_to_the_resolved_commit(hub: HubStandIn, tmp_path: Path) -> None:
    old, new = tensors(2, big=False), tensors(3, big=False)
    hub.create_repo("org/moving")
    hub.commit("org/moving", {"model.safetensors": st_bytes(tmp_path, old, "a.safetensors")})
    store = open_hub_store("hf://org/moving@main", endpoint=hub.endpoint)
    hub.commit("org/moving", {"model.safetensors": st_bytes(tmp_path, new, "b.safetensors")})
    assert_same(SafetensorsReader(store.byte_source("model.safetensors")), old)
    assert_same(
        SafetensorsReader(open_hub_store("hf://org/moving").byte_source("model.safetensors")), new
    )
    # An explicit sha reopens the old commit.
    assert_same(SafetensorsReader(open_hub_store(store.uri).byte_source("model.safetensors")), old)


def test_watch_lists_commits_with_weights_in_order_and_picks_up_new_ones(
    hub: HubStandIn, tmp_path: Path
) -> None:
    hub.create_repo("org/ft")
    hub.create_repo("org/docs")
    hub.commit("org/docs", {"README.md": b"no weights here"})
    c1 = hub.commit(
        "org/ft",
        {"config.json": b"{}", "model.safetensors": st_bytes(tmp_path, tensors(4, False), "1.st")},
    )
    hub.commit("org/ft", {"README.md": b"edit only"})  # same weights: not a new checkpoint
    c3 = hub.commit("org/ft", {"model.safetensors": st_bytes(tmp_path, tensors(5, False), "2.st")})

    source = HubSource(["org/ft", "hf://org/docs"], endpoint=hub.endpoint)
    first = source.list()
    assert [cp.id for cp in first] == [f"hf://org/ft@{c1}", f"hf://org/ft@{c3}"]
    assert all(cp.uri == cp.id for cp in first)
    assert first[0].published_at < first[1].published_at
    assert first[0].digest.startswith("sha256:") and first[0].digest != first[1].digest
    # The published digest is the digest of the checkpoint the fold will open.
    assert first[1].digest == open_hub_store(first[1].uri).content_digest()
    assert [open_checkpoint(cp.uri).digest() for cp in first] == [cp.digest for cp in first]

    c4 = hub.commit("org/ft", {"model.safetensors": st_bytes(tmp_path, tensors(6, False), "3.st")})
    second = HubSource(["org/ft", "org/docs"], endpoint=hub.endpoint).list()
    assert second[:2] == first and second[2].id == f"hf://org/ft@{c4}"
    assert len(source.list()) == 3  # the same watcher sees it too

    everything = HubSource(["org/ft"], endpoint=hub.endpoint, skip_unchanged=False).list()
    assert len(everything) == 4  # the README commit counts when asked


def test_discovers_repos_by_base_model(hub: HubStandIn, tmp_path: Path) -> None:
    w = st_bytes(tmp_path, tensors(7, False))
    hub.create_repo("org/base")
    hub.commit("org/base", {"model.safetensors": w})
    for repo, base, weights in [
        ("alice/ft-a", "org/base", True),
        ("bob/no-weights", "org/base", False),
        ("carol/other", "org/other-base", True),
        ("dave/adapter", "[org/base, x/y]", True),
    ]:
        hub.create_repo(repo)
        files: dict[str, bytes | Path] = {"README.md": CARD.format(base=base).encode()}
        if weights:
            name = "adapter_model.safetensors" if "adapter" in repo else "model.safetensors"
            files |= {name: w, "adapter_config.json": b"{}"} if "adapter" in repo else {name: w}
        hub.commit(repo, files)
    hub.commit(
        "alice/ft-a", {"model.safetensors": st_bytes(tmp_path, tensors(8, False), "v2.st")}, "v2"
    )
    heads = {r: hub.repos[r].refs["main"] for r in hub.repos}

    source = HubSource(base_model="hf://org/base@main", endpoint=hub.endpoint)
    found = source.list()
    # dave's repo was last modified before alice's second commit.
    assert [cp.id for cp in found] == [
        f"hf://dave/adapter@{heads['dave/adapter']}",
        f"hf://alice/ft-a@{heads['alice/ft-a']}",
    ]

    hub.create_repo("erin/late")
    hub.commit(
        "erin/late", {"README.md": CARD.format(base="org/base").encode(), "model.safetensors": w}
    )
    again = source.list()
    assert [cp.id.split("@")[0] for cp in again] == [
        "hf://dave/adapter",
        "hf://alice/ft-a",
        "hf://erin/late",
    ]

    # Combined: a watched repo lists every commit and is not listed twice.
    both = HubSource(["alice/ft-a"], base_model="org/base", endpoint=hub.endpoint).list()
    assert [cp.id.split("@")[0] for cp in both].count("hf://alice/ft-a") == 2
    assert len({cp.id for cp in both}) == len(both) == 4


def test_clear_errors_for_missing_repo_revision_and_file(hub: HubStandIn, tmp_path: Path) -> None:
    hub.create_repo("org/ft")
    hub.commit("org/ft", {"model.safetensors": st_bytes(tmp_path, tensors(9, False))})
    with pytest.raises(CheckpointError, match=r"hf://org/missing@main.*repository not found"):
        open_hub_store("hf://org/missing")
    with pytest.raises(CheckpointError, match=r"hf://org/ft@v9.*revision not found"):
        open_hub_store("hf://org/ft@v9")
    store = open_hub_store("hf://org/ft")
    with pytest.raises(CheckpointError, match=r"hf://org/ft@[0-9a-f]{40}/nope.bin"):
        store.byte_source("nope.bin")
    with pytest.raises(ConfigError, match="org/missing"):
        HubSource(["org/missing"]).list()
    with pytest.raises(ConfigError, match=r"org/ft@nobranch"):
        HubSource(["hf://org/ft@nobranch"]).list()
    for bad in ("hf://", "hf://org/repo@", "s3://x/y", "hf://org/re po"):
        with pytest.raises(ConfigError):
            HubRef.parse(bad)
    with pytest.raises(ConfigError):
        HubSource()


def test_range_guard_and_token(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.create_repo("org/private")
    hub.commit("org/private", {"model.safetensors": st_bytes(tmp_path, tensors(10, False))})
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    store = open_hub_store("hf://org/private")
    assert any(
        r.authorization == "Bearer hf_standin_token"
        for r in hub.requests
        if r.path.startswith("/api/")
    )
    src = store.byte_source("model.safetensors")
    hub.ignore_ranges = True
    with pytest.raises(CheckpointError, match="ignored the byte range"):
        src.read(100, 10)
    hub.ignore_ranges = False
    assert len(src.read(100, 10)) == 10


def test_ref_round_trip() -> None:
    ref = HubRef.parse("hf://org/repo@refs%2Fpr%2F1/sub/dir")
    assert (ref.repo_id, ref.revision, ref.subfolder) == ("org/repo", "refs/pr/1", "sub/dir")
    assert HubRef.parse(ref.uri()) == ref
    assert HubRef.parse("hf://gpt2") == HubRef("gpt2")


def test_source_uris_dispatch_through_sources(hub: HubStandIn, tmp_path: Path) -> None:
    hub.create_repo("org/base")
    hub.create_repo("org/ft")
    c1 = hub.commit("org/ft", {"model.safetensors": st_bytes(tmp_path, tensors(11, False))})
    hub.create_repo("eve/tuned")
    card = CARD.format(base="org/base").encode()
    e1 = hub.commit(
        "eve/tuned",
        {"README.md": card, "model.safetensors": st_bytes(tmp_path, tensors(12, False), "e")},
    )

    watch = open_source(f"hf://org/ft?endpoint={hub.endpoint}")
    assert isinstance(watch, HubSource) and isinstance(watch, Source)
    assert [cp.id for cp in watch.list()] == [f"hf://org/ft@{c1}"]
    both = open_source("hf://org/ft@main?base_model=org/base")  # endpoint from HF_ENDPOINT
    assert [cp.id for cp in both.list()] == [f"hf://org/ft@{c1}", f"hf://eve/tuned@{e1}"]
    assert open_source(both.uri).uri == both.uri
    assert [cp.id for cp in open_source("hf://?base_model=org/base").list()] == [
        f"hf://eve/tuned@{e1}"
    ]
    for bad in ("hf://org/ft?colour=red", "hf://", "hf://org/ft/sub"):
        with pytest.raises(ConfigError):
            open_source(bad)
