"""The one scheme table: how each URI scheme opens a store, a checkpoint and a source.

=================  =======================  =========================  ====================
scheme             store                    checkpoint                 source
=================  =======================  =========================  ====================
path, ``file://``  LocalStore (read-write)  a folder or one file       StoreSource
``s3://``          S3Store (read-write)     a prefix or one object     StoreSource
``hf://``          HubStore (read-only,     a repo folder or one file  HubSource
                   pinned at a commit)
``mlflow://``,     none                     the version's weights URI  MlflowSource
``models:/``                                (resolved, then opened)
=================  =======================  =========================  ====================

Every scheme opens checkpoints the same way (:func:`open_checkpoint`): a URI whose last
segment is a weight file (``*.safetensors``, or a pickle file when allowed) is that file;
anything else is a folder whose layout :mod:`mergeflow.storage.hf_layout` decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging.tensors import TensorReader
from mergeflow.storage.checkpoints import OpenedCheckpoint, open_file, open_weights
from mergeflow.storage.hf_layout import is_weight_file
from mergeflow.storage.objects import LocalStore, ObjectStore, ReadOnlyStore
from mergeflow.storage.sources import Source, StoreSource


@dataclass(frozen=True)
class Scheme:
    """How one URI scheme is opened (see the module table)."""

    names: tuple[str, ...]
    label: str
    store: Callable[[str], ReadOnlyStore] | None
    writable: bool
    source: Callable[[str], Source]
    resolve: Callable[[str], str] | None = None
    """For URIs that name another URI (an MLflow version names its weights)."""


def local_path(uri: str) -> Path:
    """The filesystem path of a local path or ``file://`` URI."""
    parsed = urlparse(uri)
    return Path(parsed.path if parsed.scheme == "file" else uri).expanduser()


def _local_store(uri: str) -> ReadOnlyStore:
    return LocalStore(local_path(uri))


def _s3_store(uri: str) -> ReadOnlyStore:
    from mergeflow.storage.s3 import S3Store  # boto3 is a pipeline extra: off the light install

    return S3Store.from_uri(uri)


def _hub_store(uri: str) -> ReadOnlyStore:
    from mergeflow.storage.hub.repo import open_hub_store  # huggingface_hub: pipeline extra

    return open_hub_store(uri)


def _store_source(uri: str) -> Source:
    return StoreSource(open_readable(uri))


def _hub_source(uri: str) -> Source:
    from mergeflow.storage.hub.source import HubSource  # huggingface_hub: pipeline extra

    return HubSource.from_uri(uri)


def _mlflow_source(uri: str) -> Source:
    from mergeflow.storage.registry import MlflowSource  # mlflow: pipeline extra

    return MlflowSource.from_uri(uri)


def _mlflow_resolve(uri: str) -> str:
    from mergeflow.storage.registry import resolve_model_uri  # mlflow: pipeline extra

    return resolve_model_uri(uri)


LOCAL = Scheme(("", "file"), "a local path", _local_store, True, _store_source)
SCHEMES: tuple[Scheme, ...] = (
    LOCAL,
    Scheme(("s3",), "s3://bucket/prefix", _s3_store, True, _store_source),
    Scheme(("hf",), "hf://org/repo[@revision]", _hub_store, False, _hub_source),
    Scheme(
        ("mlflow", "models"),
        "mlflow://models/NAME[/VERSION|@ALIAS]",
        None,
        False,
        _mlflow_source,
        _mlflow_resolve,
    ),
)


def scheme_of(uri: str) -> Scheme | None:
    """The scheme entry for ``uri``, or None when no entry knows it."""
    name = urlparse(uri).scheme
    if len(name) == 1:  # a Windows drive letter, not a scheme
        name = ""
    return next((s for s in SCHEMES if name in s.names), None)


def _known() -> str:
    return ", ".join(s.label for s in SCHEMES)


def open_readable(uri: str) -> ReadOnlyStore:
    """The store (folder, prefix, pinned repo) a URI names, for reading."""
    s = scheme_of(uri)
    if s is None or s.store is None:
        raise ConfigError(f"unsupported store URI {uri!r}: use one of {_known()}")
    return s.store(uri)


def open_store(uri: str) -> ObjectStore:
    """The store a URI names, for reading and writing (a local folder or an S3 prefix)."""
    s = scheme_of(uri)
    if s is not None and s.store is not None and not s.writable:
        raise ConfigError(f"{uri} is read-only: mergeflow never writes to {s.label}")
    if s is None or s.store is None:
        raise ConfigError(f"unsupported store URI {uri!r}: use a local path or s3://bucket/prefix")
    store = s.store(uri)
    assert isinstance(store, ObjectStore)
    return store


def read_uri(uri: str) -> bytes:
    """The bytes of one object named by a full URI; a missing one raises FileNotFoundError."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_readable(parent or ".").read_bytes(name)


def open_source(uri: str) -> Source:
    """The checkpoint source a URI names (see the module table)."""
    s = scheme_of(uri)
    if s is None:
        raise ConfigError(f"unsupported checkpoint source {uri!r}: use one of {_known()}")
    return s.source(uri)


def open_checkpoint(
    uri: str, *, base: TensorReader | None = None, allow_pickle: bool = False
) -> OpenedCheckpoint:
    """Open a checkpoint (or a base) by URI, lazily: headers are read, tensors on demand.

    A LoRA adapter folder needs ``base``. Pickle files are refused unless ``allow_pickle``
    and are then loaded with ``torch.load(weights_only=True)``. Every problem raises
    :class:`~mergeflow.errors.CheckpointError` naming ``uri``.
    """
    s = scheme_of(uri)
    if s is None:
        raise CheckpointError(
            uri, f"unsupported URI scheme {urlparse(uri).scheme!r} (use {_known()})"
        )
    if s.resolve is not None:
        inner = open_checkpoint(s.resolve(uri), base=base, allow_pickle=allow_pickle)
        return replace(inner, uri=uri)
    assert s.store is not None
    if s is LOCAL:
        path = local_path(uri)
        if not path.exists():
            raise CheckpointError(uri, "path does not exist")
        if not (path.is_file() or path.is_dir()):  # reading a FIFO or device would block
            raise CheckpointError(uri, "not a regular file or folder (a FIFO, socket or device)")
        if path.is_file() and not is_weight_file(path.name):
            raise CheckpointError(uri, "not a .safetensors file (or a folder holding a checkpoint)")
        file_parent: str | None = str(path.parent) if path.is_file() else None
        name = path.name
    else:
        parent, _, name = uri.rstrip("/").rpartition("/")
        file_parent = parent if is_weight_file(name) else None
    if file_parent is not None:
        store = s.store(file_parent)
        if not store.exists(name):
            raise CheckpointError(uri, "object does not exist")
        reader = open_file(store, name, uri, allow_pickle=allow_pickle)
        return OpenedCheckpoint(uri, reader, store, "", None, [name])
    store = s.store(uri)
    if s is not LOCAL and not store.list():
        raise CheckpointError(uri, "no objects under this prefix")
    reader, files, config = open_weights(store, uri, base=base, allow_pickle=allow_pickle)
    return OpenedCheckpoint(uri, reader, store, "", config, files)
