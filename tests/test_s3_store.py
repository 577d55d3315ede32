"""S3Store and S3Object against a real S3 API server (SeaweedFS, see fixtures_s3.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import tiny_state
from safetensors.torch import save

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.services.s3_server import ObjectStoreServer, is_healthy, sockets
from mergeflow.storage.objects import StoreSink
from mergeflow.storage.s3 import S3Object, S3Settings, S3Store, make_s3_client
from mergeflow.storage.safetensors_file import SafetensorsReader
from mergeflow.storage.schemes import open_store
from mergeflow.storage.shard_writer import ShardedWriter

pytestmark = pytest.mark.services

MiB = 1 << 20


class RequestLog:
    """Records every S3 request a client sends: operation name and Range header."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        self._client = client
        client.meta.events.register("before-send.s3", self._hook)

    def _hook(self, request: Any, **kwargs: Any) -> None:
        op = kwargs["event_name"].rsplit(".", 1)[-1]
        rng = request.headers.get("Range")
        with self._lock:
            self.calls.append((op, rng.decode() if isinstance(rng, bytes) else rng))

    def ops(self, name: str) -> list[str | None]:
        return [r for op, r in self.calls if op == name]

    def clear(self) -> None:
        self.calls.clear()


@contextmanager
def logged_store(uri: str, client: Any) -> Iterator[tuple[S3Store, RequestLog]]:
    log = RequestLog(client)
    yield S3Store.from_uri(uri, client=client), log


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(512, 256, generator=g),  # 512 KiB
        "layer.0.weight": torch.randn(1024, 512, generator=g),  # 2 MiB
        "layer.0.bias": torch.randn(512, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


def test_round_trip(s3_bucket: Any, tmp_path: Path) -> None:
    store = open_store(s3_bucket.uri)
    assert isinstance(store, S3Store) and store.uri == s3_bucket.uri
    store.write_bytes("a/x.json", b'{"a": 1}')
    store.write_bytes("a/y.bin", b"\x00" * 10)
    store.write_bytes("ab/z.bin", b"z")
    local = tmp_path / "f.bin"
    local.write_bytes(b"0123456789")
    store.put_file(local, "a/sub/f.bin")

    assert store.read_bytes("a/x.json") == b'{"a": 1}'
    assert store.exists("a/x.json") and not store.exists("a/nope")
    assert [o.relpath for o in store.list()] == ["a/sub/f.bin", "a/x.json", "a/y.bin", "ab/z.bin"]
    # A prefix is a folder: "a" must not match "ab/".
    infos = store.list("a")
    assert [o.relpath for o in infos] == ["a/sub/f.bin", "a/x.json", "a/y.bin"]
    assert {o.relpath: o.size for o in infos}["a/y.bin"] == 10
    assert all(o.etag and o.mtime > 0 for o in infos)
    assert [o.relpath for o in store.list("a/x.json")] == ["a/x.json"]

    child = store.child("a/sub")
    assert child.uri == f"{s3_bucket.uri}/a/sub"
    assert child.read_bytes("f.bin") == b"0123456789"
    assert [o.relpath for o in child.list()] == ["f.bin"]
    src = child.byte_source("f.bin")
    assert src.size() == 10 and src.read(3, 4) == b"3456"

    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/nope")
    with pytest.raises(ConfigError, match="escapes|clean relative"):
        store.read_bytes("../other")

    store.delete_prefix("a")
    assert [o.relpath for o in store.list()] == ["ab/z.bin"]
    store.delete_prefix()
    assert store.list() == []


def test_header_is_one_get_and_tensors_are_ranged(s3_bucket: Any) -> None:
    ts = tensors()
    blob = save(ts, metadata={"format": "pt"})
    assert (
        len(blob) > SafetensorsReader.SPECULATIVE_PREFIX
    )  # so the prefix GET is not the whole object
    client = s3_bucket.client()
    with logged_store(s3_bucket.uri, client) as (store, log):
        store.write_bytes("m/model.safetensors", blob)
        log.clear()
        reader = SafetensorsReader(store.byte_source("m/model.safetensors"))
        assert log.ops("HeadObject") == [None]
        gets = log.ops("GetObject")
        assert gets == [f"bytes=0-{SafetensorsReader.SPECULATIVE_PREFIX - 1}"]
        assert sorted(reader.keys()) == sorted(ts)
        log.clear()
        for k, t in ts.items():
            got = reader.get(k)
            assert got.dtype == t.dtype and torch.equal(got, t)
        gets = log.ops("GetObject")
        assert len(gets) == len(ts)  # one ranged GET per tensor
        assert all(g is not None and g.startswith("bytes=") for g in gets)
        # Each range is exactly one tensor's bytes: never the whole object.
        sizes = sorted(int(g[6:].split("-")[1]) - int(g[6:].split("-")[0]) + 1 for g in gets)
        assert sizes == sorted(t.numel() * t.element_size() for t in ts.values())
        assert [op for op, _ in log.calls] == ["GetObject"] * len(ts)


def test_truncated_and_missing_objects_are_checkpoint_errors(s3_bucket: Any) -> None:
    store = S3Store.from_uri(s3_bucket.uri)
    blob = save(tensors())
    store.write_bytes("short.safetensors", blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsReader(store.byte_source("short.safetensors"))
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsReader(store.byte_source("missing.safetensors"))
    src = store.byte_source("short.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        src.read(len(blob) - 200, 150)


def test_object_replaced_while_reading_is_detected(s3_bucket: Any) -> None:
    store = S3Store.from_uri(s3_bucket.uri)
    store.write_bytes("m.safetensors", save(tensors()))
    reader = SafetensorsReader(store.byte_source("m.safetensors"))
    g = torch.Generator().manual_seed(1)
    store.write_bytes(
        "m.safetensors",
        save({k: torch.randn(t.shape, generator=g).to(t.dtype) for k, t in tensors().items()}),
    )
    with pytest.raises(CheckpointError, match="changed while"):
        reader.get("layer.0.weight")


def test_sharded_writer_uploads_multipart(s3_bucket: Any) -> None:
    g = torch.Generator().manual_seed(2)
    ts = {f"w{i}": torch.randn(MiB // 2, generator=g) for i in range(3)}  # 2 MiB each
    ts["big"] = torch.randn(3 * MiB, generator=g)  # 12 MiB: its shard must go multipart
    client = s3_bucket.client()
    with logged_store(s3_bucket.uri, client) as (store, log):
        writer = ShardedWriter(StoreSink(store, "out"), max_shard_size=10 * MiB)
        for k, t in ts.items():
            writer.add(k, t)
        names = writer.commit({"step": "1"})
        assert len(names) == 2
        assert len(log.ops("CreateMultipartUpload")) == 1  # only the > 8 MiB shard
        assert len(log.ops("UploadPart")) == 2  # 12 MiB in 8 MiB parts
        assert len(log.ops("CompleteMultipartUpload")) == 1
        assert len(log.ops("PutObject")) == 2  # the small shard and the index

    listed = {o.relpath: o for o in store.list("out")}
    assert set(listed) == {f"out/{n}" for n in names} | {"out/model.safetensors.index.json"}
    index = json.loads(store.read_bytes("out/model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(ts)
    for name in names:
        r = SafetensorsReader(store.byte_source(f"out/{name}"))
        assert listed[f"out/{name}"].size == r._src.size()
        assert r.metadata["step"] == "1"
        for k in r.keys():
            assert torch.equal(r.get(k), ts[k])


def test_missing_bucket_is_a_config_error(s3_bucket: Any, tmp_path: Path) -> None:
    store = S3Store.from_uri("s3://no-such-bucket-mergeflow/x")
    with pytest.raises(
        ConfigError, match="bucket 'no-such-bucket-mergeflow' does not exist at http://127.0.0.1"
    ):
        store.list()
    with pytest.raises(ConfigError, match="does not exist"):
        store.write_bytes("a", b"1")
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (9 * MiB))
    with pytest.raises(ConfigError, match="does not exist"):
        store.put_file(big, "big.bin")


def test_wrong_credentials_are_a_config_error(
    s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = S3Store.from_uri(s3_bucket.uri)
    with pytest.raises(ConfigError, match="access denied.*AWS_ACCESS_KEY_ID"):
        store.list()


def test_unreachable_endpoint_is_a_config_error(
    s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MERGEFLOW_S3_MAX_ATTEMPTS", "1")
    store = S3Store.from_uri(s3_bucket.uri)
    with pytest.raises(ConfigError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        store.exists("x")
    assert not is_healthy("http://127.0.0.1:9", timeout=0.5)


def test_endpoint_argument_and_settings(s3_bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("MERGEFLOW_S3_ENDPOINT_URL", s3_bucket.endpoint_url)
    S3Store.from_uri(s3_bucket.uri).write_bytes("k", b"v")
    monkeypatch.delenv("MERGEFLOW_S3_ENDPOINT_URL")
    client = make_s3_client(s3_bucket.endpoint_url, S3Settings(max_attempts=2))
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert S3Object(client, s3_bucket.bucket, f"{s3_bucket.prefix}/k").read_prefix(10) == b"v"


def test_large_ranges_are_read_as_concurrent_parts_and_stay_pinned(s3_bucket: Any) -> None:
    data = bytes(range(256)) * 40  # 10 240 bytes
    store = S3Store.from_uri(s3_bucket.uri)
    store.write_bytes("big", data)
    client = make_s3_client(s3_bucket.endpoint_url)
    key = f"{s3_bucket.prefix}/big"
    parts = S3Object(client, s3_bucket.bucket, key, settings=S3Settings(multipart_chunksize=1000))
    assert parts.size() == len(data)
    assert parts.read(17, 9000) == data[17:9017]  # 10 concurrent ranged GETs
    store.write_bytes("big", data[::-1])  # overwritten after the HEAD: the pinned ETag refuses it
    with pytest.raises(CheckpointError, match="object changed while it was being read"):
        parts.read(0, 5000)


def test_embedded_store_keeps_objects_across_restart(tmp_path: Path) -> None:
    server = ObjectStoreServer(tmp_path / "store")
    try:
        server.start()
        assert is_healthy(server.endpoint_url)
        server.ensure_bucket("keep")
        server.client().put_object(Bucket="keep", Key="a/b", Body=b"survives")
        with pytest.raises(ConfigError, match="in use"):
            ObjectStoreServer(tmp_path / "other", port=server.port).start()
        assert sockets(server.port), "weed made no unix socket in /tmp (moved?)"
        server.stop(grace=0.0)  # SIGKILL right after the write: acknowledged objects are on disk
        assert not is_healthy(server.endpoint_url, timeout=0.5)
        assert not sockets(server.port)  # weed leaves them; stop removes them
        server.start()
        assert server.client().get_object(Bucket="keep", Key="a/b")["Body"].read() == b"survives"
    finally:
        server.stop(grace=1.0)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 300 MiB tmpfs: a machine whose disk is nearly full (needs root to mount)."""
    import os
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_nearly_full_disk_still_serves_several_buckets(small_disk: Path) -> None:
    """SeaweedFS' default volume count is free disk / volume size; each bucket takes several
    volumes, so with little disk free a second bucket got none and its writes failed after
    30 s. The store runs with a fixed count (volumes are sparse) and only real writes use disk."""
    server = ObjectStoreServer(small_disk / "store")
    try:
        server.start()
        for bucket in ("first", "second", "third"):
            server.ensure_bucket(bucket)
            server.client().put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
            assert server.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"x" * 1000
    finally:
        server.stop(grace=1.0)


def test_upload_checksums_are_botocores_default_except_over_plain_http(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mergeflow.storage.s3 import make_s3_client

    for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MERGEFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    calc = lambda url: make_s3_client(url).meta.config.request_checksum_calculation  # noqa: E731
    assert calc("http://127.0.0.1:9000") == "when_required"  # SigV4 signs the payload already
    assert calc("https://s3.example.com") == "when_supported"
    assert calc(None) == "when_supported"  # AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    assert calc(None) == "when_required"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    config = tmp_path / "aws-config"
    config.write_text("[default]\nendpoint_url = http://127.0.0.1:9001\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    assert make_s3_client().meta.endpoint_url == "http://127.0.0.1:9001"
    assert calc(None) == "when_required"  # the endpoint came from the config file


def test_a_state_in_s3_gets_its_shards_while_the_fold_runs_and_a_refused_fold_leaves_none(
    s3_bucket: Any, tmp_path: Path, cli: Any, model_files: Any
) -> None:
    """``state fold`` into S3 with several state shards (each uploaded while the next is
    folded) equals the same folds into a local folder; a checkpoint refused after the whole
    pass (another base: its task-vector ratio is only known at the end, when every shard but
    the last is in S3 already) leaves the state and the bucket as they were."""
    from safetensors.torch import save_file

    from mergeflow.storage import states

    base, cks = model_files(2)
    alien = tmp_path / "alien.safetensors"
    save_file({k: v * 40 if v.is_floating_point() else v for k, v in tiny_state(7).items()}, alien)
    uri = f"{s3_bucket.uri}/state"
    local = tmp_path / "local-state"
    for where in (uri, local):
        assert (
            cli("state", "init", "--state", where, "--base", base, "--method", "opcm").returncode
            == 0
        )
        r = cli("state", "fold", "--state", where, "--max-shard-size", "600B", *cks)
        assert r.returncode == 0, r.stderr
    store = open_store(uri)
    before = {o.relpath: o.etag for o in store.list()}
    shards = [p for p in before if p.endswith(".safetensors")]
    assert len(shards) > 3 and all("-of-" not in p for p in shards)
    (_, s3_reader), (_, local_reader) = (
        states.load_state(store),
        states.load_state(open_store(str(local))),
    )
    assert s3_reader is not None and local_reader is not None
    assert s3_reader.keys() == local_reader.keys()
    for k in s3_reader.keys():
        assert torch.equal(s3_reader.get(k), local_reader.get(k)), k

    r = cli("state", "fold", "--state", uri, "--max-shard-size", "600B", alien)
    assert r.returncode == 2 and "max_task_vector_ratio" in r.stderr
    assert {o.relpath: o.etag for o in store.list()} == before


def test_weights_are_stored_as_sent_and_not_gzipped_by_the_embedded_store(
    s3_bucket: Any, tmp_path: Path
) -> None:
    """Uploads declare their type, multipart parts too: SeaweedFS gzips an untyped part whose
    first 128 bytes compress, which a float32 upcast of bf16 values (half its bytes zero) does,
    at about 35 MB/s of the store's CPU. Typed, the part is stored as sent."""
    data = torch.randn(6 * MiB, generator=torch.Generator().manual_seed(3)).bfloat16().float()
    f = tmp_path / "model.safetensors"
    f.write_bytes(data.numpy().tobytes())  # 24 MiB: three parts
    meta = tmp_path / "state.json"
    meta.write_text('{"step": 1}')
    store = S3Store.from_uri(s3_bucket.uri)
    volumes = s3_bucket.server.data_dir / "data"

    def stored() -> int:
        return sum(p.stat().st_size for p in volumes.glob("*.dat"))

    before = stored()
    store.put_file(f, "w/model.safetensors")
    assert stored() - before >= f.stat().st_size  # gzipped it would be about half
    store.put_file(meta, "w/state.json")
    bucket, prefix = s3_bucket.uri.removeprefix("s3://").split("/", 1)
    head = store.client.head_object(Bucket=bucket, Key=f"{prefix}/w/model.safetensors")
    assert head["ContentType"] == "application/octet-stream"
    head = store.client.head_object(Bucket=bucket, Key=f"{prefix}/w/state.json")
    assert head["ContentType"] == "application/json"
    assert store.read_bytes("w/model.safetensors") == f.read_bytes()
