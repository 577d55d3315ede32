"""Checkpoint readers over a store folder: shards, single files, PEFT LoRA adapters, opt-in pickle.

Every reader is lazy: opening parses headers only; ``get`` reads one tensor. Which files a
folder's weights are is decided by :mod:`mergeflow.storage.hf_layout`; opening by URI is
:func:`mergeflow.storage.schemes.open_checkpoint`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging.stats import STATS_FILE, CheckpointStats, check_stats
from mergeflow.merging.tensors import TORCH_TO_SAFETENSORS, DictReader, TensorMeta, TensorReader
from mergeflow.storage.digest_cache import cached_digest
from mergeflow.storage.hf_layout import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    MAX_JSON_BYTES,
    SMALL_FILES,
    LayoutError,
    is_weight_file,
    parse_index,
    weight_layout,
)
from mergeflow.storage.lora import LoraReader
from mergeflow.storage.objects import LocalStore, ReadOnlyStore
from mergeflow.storage.safetensors_file import SafetensorsReader


class ShardedReader:
    """A reader over ``model.safetensors.index.json`` and its shards; one shard open at a time."""

    def __init__(
        self, store: ReadOnlyStore, prefix: str, label: str, weight_map: Mapping[str, str]
    ) -> None:
        self.source = label
        self._store = store
        self._prefix = prefix
        wm = dict(weight_map)
        self._map: dict[str, str] = wm
        self._metas: dict[str, TensorMeta] = {}
        self._open: tuple[str, SafetensorsReader] | None = None
        for shard in dict.fromkeys(wm.values()):
            r = self._reader(shard)
            for k in r.keys():
                if wm.get(k) == shard:
                    self._metas[k] = r.meta(k)
        absent = [k for k, s in wm.items() if k not in self._metas]
        if absent:
            raise CheckpointError(
                label,
                f"tensor {absent[0]!r} is listed in {INDEX_FILE} but not in shard {wm[absent[0]]}",
            )

    def _reader(self, shard: str) -> SafetensorsReader:
        if self._open is None or self._open[0] != shard:
            if self._open is not None:
                self._open[1].close()
            self._open = (
                shard,
                SafetensorsReader(
                    self._store.byte_source(self._prefix + shard), f"{self.source}/{shard}"
                ),
            )
        return self._open[1]

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> TensorMeta:
        return self._metas[key]

    def get(self, key: str) -> torch.Tensor:
        return self._reader(self._map[key]).get(key)


def pickle_reader(data: bytes, label: str) -> TensorReader:
    """Tensors of a pickle file, loaded with ``torch.load(weights_only=True)`` (never arbitrary code)."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            label,
            f"cannot load pickle weights with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            label, "pickle file does not hold a mapping of tensor names to tensors"
        )
    bad = [k for k, v in obj.items() if v.dtype not in TORCH_TO_SAFETENSORS]
    if bad:
        raise CheckpointError(label, f"tensor {bad[0]!r} has unsupported dtype {obj[bad[0]].dtype}")
    return DictReader({k: v.contiguous() for k, v in obj.items()}, label)


PICKLE_REFUSED = (
    "pickle weights are only loaded when allowed (the CLI's --allow-pickle, a lineage's "
    "allow_pickle: true), and then with torch.load(weights_only=True)"
)


@dataclass
class OpenedCheckpoint:
    """An opened checkpoint: its lazy reader, the store folder it lives in, and its config."""

    uri: str
    reader: TensorReader
    store: ReadOnlyStore
    prefix: str = ""
    config: dict[str, Any] | None = None
    weight_files: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """Content digest: sha256 of the weight files' bytes (local, cached by the files'
        identity: :mod:`~mergeflow.storage.digest_cache`) or of their ETags (remote)."""
        if isinstance(self.store, LocalStore):
            root, rels = self.store.root, sorted(self.weight_files)
            return cached_digest([root / (self.prefix + r) for r in rels], self._local_digest)
        h = hashlib.sha256()
        infos = {i.relpath: i for i in self.store.list(self.prefix.rstrip("/"))}
        for rel in sorted(self.weight_files):
            i = infos.get(self.prefix + rel)
            h.update(f"{rel}\0{i.size if i else -1}\0{i.etag if i else ''}\n".encode())
        return "sha256:" + h.hexdigest()

    def _local_digest(self) -> str:
        """sha256 of the local weight files' bytes (names too when there are several)."""
        h = hashlib.sha256()
        assert isinstance(self.store, LocalStore)
        for rel in sorted(self.weight_files):
            if len(self.weight_files) > 1:  # a lone file's name is not content
                h.update(rel.encode() + b"\0")
            with open(self.store.root / (self.prefix + rel), "rb") as f:
                while chunk := f.read(8 * 2**20):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()

    def small_files(self) -> list[str]:
        """Non-weight files worth copying next to a merged model (config, tokenizer)."""
        return [f for f in SMALL_FILES if self.store.exists(self.prefix + f)]

    def stats(self, base: TensorReader) -> CheckpointStats | None:
        """The ``mergeflow_stats.safetensors`` published beside the weights, validated against
        ``base`` from its header (:func:`~mergeflow.merging.stats.check_stats`); None if absent."""
        name = self.prefix + STATS_FILE
        if not self.store.exists(name):
            return None
        check_regular_files(self.store, [name], self.uri)
        reader = SafetensorsReader(self.store.byte_source(name), f"{self.uri} ({STATS_FILE})")
        return check_stats(reader, reader.metadata, base, self.reader)


def _read_json(
    store: ReadOnlyStore, rel: str, label: str, size: int | None = None
) -> dict[str, Any]:
    name = rel.rsplit("/", 1)[-1]
    if size is not None and size > MAX_JSON_BYTES:
        raise CheckpointError(label, f"{name} is larger than {MAX_JSON_BYTES // 2**20} MiB")
    data = store.read_bytes(rel)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(label, f"{name} is larger than {MAX_JSON_BYTES // 2**20} MiB")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(label, f"{name} is not valid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(label, f"{name} is not a JSON object")
    return obj


def check_special_files(store: ReadOnlyStore, prefix: str, label: str) -> None:
    """On a local folder: refuse a weight, index or config name that is not a regular file
    (a FIFO or device, directly or through a link), which a listing silently skips."""
    if not isinstance(store, LocalStore):
        return
    folder = store.root / prefix
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (is_weight_file(name) or name in (INDEX_FILE, CONFIG_FILE, ADAPTER_CONFIG)):
            continue
        try:
            regular = entry.is_file(follow_symlinks=True)
            exists = entry.is_dir(follow_symlinks=True) or os.path.exists(entry.path)
        except OSError:
            regular, exists = False, True
        if exists and not regular and not entry.is_dir(follow_symlinks=True):
            raise CheckpointError(
                label, f"{name} is not a regular file (a FIFO, socket or device); refused"
            )


def check_regular_files(store: ReadOnlyStore, names: Iterable[str], label: str) -> None:
    """On a local folder: every named file is a regular file inside the folder.

    A FIFO, socket or device would block or stream forever when read, and a symlink
    leading out of the folder reads a file the publisher does not own: both are refused
    before anything is opened. (S3 objects and Hub files are always plain bytes.)
    """
    if not isinstance(store, LocalStore):
        return
    root = store.root.resolve()
    for name in names:
        path = store.root / name
        try:
            st = os.stat(path)  # follows symlinks; lstat alone would miss a link to a FIFO
        except OSError as e:
            raise CheckpointError(label, f"{name}: cannot stat ({e.strerror})") from None
        real = path.resolve()
        if real != root and root not in real.parents:
            raise CheckpointError(
                label, f"{name} is a link to {real}, outside the checkpoint folder; refused"
            )
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                label, f"{name} is not a regular file (a FIFO, socket or device); refused"
            )


def open_file(
    store: ReadOnlyStore, name: str, label: str, *, allow_pickle: bool = False
) -> TensorReader:
    """A reader over one weight file of a store: safetensors, or (when allowed) pickle."""
    check_regular_files(store, [name], label)
    if name.endswith(".safetensors"):
        return SafetensorsReader(store.byte_source(name), label)
    if not allow_pickle:
        raise CheckpointError(label, f"pickle weights are refused; {PICKLE_REFUSED}")
    return pickle_reader(store.read_bytes(name), label)


def open_weights(
    store: ReadOnlyStore,
    label: str,
    *,
    prefix: str = "",
    base: TensorReader | None = None,
    allow_pickle: bool = False,
) -> tuple[TensorReader, list[str], dict[str, Any] | None]:
    """Open the weights in a store folder. Returns (reader, weight files, config.json or None)."""
    try:
        return _open_weights(store, label, prefix, base, allow_pickle)
    except ConfigError as e:
        if "escapes the store root" not in str(e):
            raise
        raise CheckpointError(label, f"a file leads outside the checkpoint folder ({e})") from None


def _open_weights(
    store: ReadOnlyStore,
    label: str,
    prefix: str,
    base: TensorReader | None,
    allow_pickle: bool,
) -> tuple[TensorReader, list[str], dict[str, Any] | None]:
    check_special_files(store, prefix, label)
    sizes = {
        i.relpath[len(prefix) :]: i.size
        for i in store.list(prefix.rstrip("/"))
        if "/" not in i.relpath[len(prefix) :]
    }
    names = list(sizes)
    config = (
        _read_json(store, prefix + CONFIG_FILE, label, sizes[CONFIG_FILE])
        if CONFIG_FILE in names
        else None
    )
    try:
        if INDEX_FILE in names and sizes[INDEX_FILE] > MAX_JSON_BYTES:
            raise LayoutError(f"{INDEX_FILE} is larger than {MAX_JSON_BYTES // 2**20} MiB")
        index = parse_index(store.read_bytes(prefix + INDEX_FILE)) if INDEX_FILE in names else None
        layout = weight_layout(names, index)
    except LayoutError as e:
        raise CheckpointError(label, str(e)) from None
    files = list(layout.files)
    check_regular_files(store, [prefix + f for f in files], label)
    if layout.kind == "sharded":
        assert index is not None
        return ShardedReader(store, prefix, label, index), files, config
    if layout.kind == "adapter":
        if base is None:
            raise CheckpointError(label, "a LoRA adapter can only be read against a base model")
        acfg = _read_json(store, prefix + ADAPTER_CONFIG, label, sizes.get(ADAPTER_CONFIG))
        adapter = SafetensorsReader(store.byte_source(prefix + ADAPTER_FILE), label)
        return LoraReader(base, adapter, acfg, label), files, config
    if layout.kind == "pickle" and not allow_pickle:
        raise CheckpointError(
            label, f"only pickle weights found ({layout.weights[0]}); {PICKLE_REFUSED}"
        )
    return open_file(store, prefix + layout.weights[0], label, allow_pickle=True), files, config
