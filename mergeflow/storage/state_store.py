"""Persist merge states in an object store and fold checkpoints into them.

Layout under a state prefix::

    state.json                    manifest: StateInfo + where its tensors and heads live
    tensors/step-00003/...        the state tensors (model.safetensors or shards + index)
    heads/step-00003/...          tensors of checkpoint 3 that the base lacks

``state.json`` is written last, so a crash mid-fold leaves the previous state intact.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mergeflow.errors import StateError
from mergeflow.merging import engine
from mergeflow.merging.io import TensorReader
from mergeflow.merging.state import StateInfo
from mergeflow.storage.checkpoints import Checkpoint, open_weights
from mergeflow.storage.safetensors_io import ShardedWriter
from mergeflow.storage.store import ObjectStore, StoreSink

MANIFEST = "state.json"
DEFAULT_SHARD = 5 * 2**30


class StateManifest(BaseModel):
    """``state.json``: the state's JSON half plus the locations of its tensors and heads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    info: StateInfo
    tensors: str | None = None  # URI of the tensors folder (None at step 0)
    heads: dict[str, str] = {}  # checkpoint id -> URI of its heads folder


def _uri(store: ObjectStore, rel: str) -> str:
    return f"{store.uri.rstrip('/')}/{rel}"


def _store_for(uri: str, home: ObjectStore) -> tuple[ObjectStore, str]:
    from mergeflow.storage.store import open_store

    base = home.uri.rstrip("/") + "/"
    if uri.startswith(base):
        return home, uri[len(base) :].rstrip("/") + "/"
    return open_store(uri), ""


def has_state(store: ObjectStore) -> bool:
    return store.exists(MANIFEST)


def read_manifest(store: ObjectStore) -> StateManifest:
    if not store.exists(MANIFEST):
        raise StateError(
            f"no merge state at {store.uri} (missing {MANIFEST}); create one with `mergeflow state init`"
        )
    try:
        return StateManifest.model_validate(json.loads(store.read_bytes(MANIFEST)))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as e:
        raise StateError(
            f"{_uri(store, MANIFEST)} is not a valid mergeflow state ({str(e).splitlines()[0]})"
        ) from None


def write_manifest(store: ObjectStore, manifest: StateManifest) -> None:
    store.write_bytes(MANIFEST, manifest.model_dump_json(indent=2).encode())


def init_state(store: ObjectStore, info: StateInfo) -> StateManifest:
    """Write a step-0 state; refuses to overwrite an existing one."""
    if has_state(store):
        raise StateError(f"a merge state already exists at {store.uri}")
    m = StateManifest(info=info)
    write_manifest(store, m)
    return m


def load_state(store: ObjectStore) -> tuple[StateManifest, TensorReader | None]:
    """The manifest and a lazy reader over the state tensors (None at step 0)."""
    m = read_manifest(store)
    if m.tensors is None:
        return m, None
    s, prefix = _store_for(m.tensors, store)
    reader, _, _ = open_weights(s, m.tensors, prefix=prefix)
    return m, reader


def heads_reader(
    store: ObjectStore, manifest: StateManifest, checkpoint_id: str
) -> TensorReader | None:
    """The task-specific tensors kept for one folded checkpoint, if it had any."""
    uri = manifest.heads.get(checkpoint_id)
    if uri is None:
        return None
    s, prefix = _store_for(uri, store)
    return open_weights(s, uri, prefix=prefix)[0]


def fold_checkpoint(
    src: ObjectStore,
    dst: ObjectStore,
    base: TensorReader,
    checkpoint: Checkpoint,
    *,
    checkpoint_id: str | None = None,
    digest: str | None = None,
    device: str | None = "cpu",
    max_shard_size: int = DEFAULT_SHARD,
    progress: bool = False,
) -> StateManifest:
    """Fold one checkpoint into the state at ``src`` and write the new state at ``dst``.

    ``dst`` may equal ``src`` (in-place update: new tensors first, manifest last, old
    tensors removed after). Nothing under ``dst`` changes if the fold fails.
    """
    manifest, state = load_state(src)
    info = manifest.info
    step = info.step + 1
    rel_t, rel_h = f"tensors/step-{step:05d}", f"heads/step-{step:05d}"
    dst.delete_prefix(rel_t)
    dst.delete_prefix(rel_h)
    out = ShardedWriter(StoreSink(dst, rel_t), max_shard_size)
    heads_out = ShardedWriter(StoreSink(dst, rel_h), max_shard_size)
    cid = checkpoint_id or checkpoint.uri
    try:
        new_info = engine.fold(
            info,
            state,
            base,
            checkpoint.reader,
            checkpoint_id=cid,
            digest=digest or checkpoint.digest(),
            out=out,
            heads_out=heads_out,
            device=device,
            progress=progress,
        )
    except BaseException:
        dst.delete_prefix(rel_t)
        dst.delete_prefix(rel_h)
        raise
    heads = dict(manifest.heads)
    if new_info.heads.get(cid):
        heads[cid] = _uri(dst, rel_h)
    else:
        dst.delete_prefix(rel_h)
    new = StateManifest(info=new_info, tensors=_uri(dst, rel_t), heads=heads)
    write_manifest(dst, new)
    if dst.uri == src.uri and manifest.tensors and manifest.tensors != new.tensors:
        old, prefix = _store_for(manifest.tensors, src)
        if old is src:
            src.delete_prefix(prefix.rstrip("/"))
    return new


def export_state(
    store: ObjectStore,
    base: TensorReader,
    out: ShardedWriter,
    *,
    dtype: str | None = None,
    device: str | None = "cpu",
    progress: bool = False,
) -> StateInfo:
    """Stream the merged model of the state at ``store`` into ``out``."""
    manifest, state = load_state(store)
    engine.export(manifest.info, state, base, out, dtype=dtype, device=device, progress=progress)
    return manifest.info


def summary(manifest: StateManifest) -> dict[str, Any]:
    """A small JSON-able description of a state (for `mergeflow state show`)."""
    i = manifest.info
    return {
        "method": i.method,
        "params": i.params,
        "step": i.step,
        "coefficient": i.coefficient,
        "scalars": i.scalars,
        "base": i.base.model_dump(),
        "projection": {
            "kind": i.projection.kind,
            "description": i.projection.description,
            "count": len(i.projection.projected),
        },
        "checkpoints": [c.model_dump() for c in i.checkpoints],
        "tensors": manifest.tensors,
        "heads": manifest.heads,
    }
