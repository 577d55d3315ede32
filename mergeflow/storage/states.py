"""Merge states on an object store: the layout, and the one way a fold's output is committed.

Layout under a state prefix::

    state.json                    manifest: StateInfo + where its tensors and heads live
    tensors/step-00003/...        the state tensors (model.safetensors, or shards + index)
    heads/step-00003/...          tensors of checkpoint 3 that the base lacks
    tensors/step-00003/vocab/...  vocab: union: the added tokens' rows and the union's tokenizer

Every fold writes through a :class:`StateWrite`: ``begin`` (clears what a crashed attempt
at the same step left), then the tensors (one writer, or disjoint parts from several
workers), the heads, and ``commit``, which writes ``state.json`` last. So a crash at any
point leaves the previous state intact, and a state is visible whole or not at all.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mergeflow.errors import StateError
from mergeflow.merging import engine, export
from mergeflow.merging.methods.base import Objective
from mergeflow.merging.state import StateInfo
from mergeflow.merging.stats import CheckpointStats
from mergeflow.merging.tensors import TensorReader
from mergeflow.storage import vocab
from mergeflow.storage.checkpoints import OpenedCheckpoint, open_weights
from mergeflow.storage.hf_layout import INDEX_FILE
from mergeflow.storage.objects import ObjectStore, StoreSink
from mergeflow.storage.schemes import open_store
from mergeflow.storage.shard_writer import ShardedWriter

MANIFEST = "state.json"
DEFAULT_SHARD = 2**30
"""State tensors go out in 1 GiB shards, each handed to the store while the next is folded
(:class:`ShardedWriter`'s ``background``): an upload overlaps the fold instead of following it."""


class StateManifest(BaseModel):
    """``state.json``: the state's JSON half plus the locations of its tensors and heads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    info: StateInfo
    tensors: str | None = None  # URI of the tensors folder (None at step 0)
    heads: dict[str, str] = {}  # checkpoint id -> URI of its heads folder


def _uri(store: ObjectStore, rel: str) -> str:
    return f"{store.uri.rstrip('/')}/{rel}"


def _store_for(uri: str, home: ObjectStore) -> tuple[ObjectStore, str]:
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


def vocab_folder(store: ObjectStore, manifest: StateManifest) -> vocab.Folder | None:
    """Where a state keeps its added rows and tokenizer files (beside its tensors)."""
    if manifest.tensors is None:
        return None
    s, prefix = _store_for(manifest.tensors, store)
    return s, f"{prefix}{vocab.VOCAB_DIR}/"


def open_fold(
    src: ObjectStore,
    base: OpenedCheckpoint | TensorReader,
    checkpoint: OpenedCheckpoint,
    checkpoint_id: str | None = None,
) -> tuple[StateManifest, vocab.VocabFold]:
    """The state at ``src`` and the readers that fold ``checkpoint`` into it, vocabulary rows
    aligned by token (:func:`mergeflow.storage.vocab.align`; a bare base reader: by index)."""
    manifest, state = load_state(src)
    if not isinstance(base, OpenedCheckpoint):
        return manifest, vocab.VocabFold(base, checkpoint.reader, state)
    folder = vocab_folder(src, manifest)
    cid = checkpoint_id or checkpoint.uri
    info = manifest.info
    return manifest, vocab.align(
        info.vocab, info.options.vocab, state, folder, base, checkpoint, cid
    )


def heads_reader(
    store: ObjectStore, manifest: StateManifest, checkpoint_id: str
) -> TensorReader | None:
    """The task-specific tensors kept for one folded checkpoint, if it had any."""
    uri = manifest.heads.get(checkpoint_id)
    if uri is None:
        return None
    s, prefix = _store_for(uri, store)
    return open_weights(s, uri, prefix=prefix)[0]


class StateWrite:
    """One fold's new state under ``dst``: ``begin`` -> tensors / parts / heads -> ``commit``.

    ``parent`` is the manifest folded from and ``parent_store`` where it lives (when it is
    ``dst`` itself, the parent's tensors are removed after the commit: an in-place update).
    Workers of a distributed fold each write one ``part`` and return :meth:`part_map`;
    the driver passes the maps to :meth:`commit`.
    """

    def __init__(
        self,
        dst: ObjectStore,
        step: int,
        *,
        parent: StateManifest | None = None,
        parent_store: ObjectStore | None = None,
        max_shard_size: int = DEFAULT_SHARD,
    ) -> None:
        self.dst = dst
        self.step = step
        self.parent = parent
        self.parent_store = parent_store
        self.max_shard_size = max_shard_size
        self.rel_tensors = f"tensors/step-{step:05d}"
        self.rel_heads = f"heads/step-{step:05d}"

    @classmethod
    def begin(
        cls,
        dst: ObjectStore,
        parent: StateManifest,
        parent_store: ObjectStore,
        max_shard_size: int = DEFAULT_SHARD,
    ) -> StateWrite:
        """Start writing step ``parent.step + 1`` under ``dst``, clearing a crashed attempt's leftovers."""
        w = cls(
            dst,
            parent.info.step + 1,
            parent=parent,
            parent_store=parent_store,
            max_shard_size=max_shard_size,
        )
        w.abort()
        return w

    def tensors(self) -> ShardedWriter:
        """The writer of every state tensor (single-process fold); shards leave in the background."""
        return ShardedWriter(
            StoreSink(self.dst, self.rel_tensors),
            self.max_shard_size,
            background=True,
            metadata=engine.state_metadata(self.step),
        )

    def part(self, index: int) -> ShardedWriter:
        """The writer of one disjoint part of the state tensors (one worker of a distributed fold)."""
        return ShardedWriter(
            StoreSink(self.dst, self.rel_tensors),
            self.max_shard_size,
            prefix=f"part-{index:05d}",
            background=True,
            metadata=engine.state_metadata(self.step),
        )

    def part_map(self, index: int, names: list[str], keys: list[str]) -> dict[str, str]:
        """Tensor name -> shard file of a committed part (``names``: what its writer returned)."""
        if len(names) == 1:
            return dict.fromkeys(keys, names[0])
        idx = f"{self.rel_tensors}/part-{index:05d}.safetensors.index.json"
        weight_map: dict[str, str] = json.loads(self.dst.read_bytes(idx))["weight_map"]
        self.dst.delete_prefix(idx)
        return weight_map

    def heads(self) -> ShardedWriter:
        """The writer of the folded checkpoint's tensors that the base lacks."""
        return ShardedWriter(StoreSink(self.dst, self.rel_heads), self.max_shard_size)

    def member_heads(self, index: int) -> tuple[ShardedWriter, str]:
        """The writer of one pool member's heads (a pool state keeps every member's) and the
        URI to record for them."""
        rel = f"{self.rel_heads}/{index:05d}"
        return ShardedWriter(StoreSink(self.dst, rel), self.max_shard_size), _uri(self.dst, rel)

    def commit(
        self,
        info: StateInfo,
        parts: list[dict[str, str]] | None = None,
        heads: dict[str, str] | None = None,
    ) -> StateManifest:
        """Write the parts' index (if any), then ``state.json``: the commit point.

        ``heads``: checkpoint id -> heads URI of every checkpoint (a pool state); by default
        the parent's plus the folded checkpoint's."""
        if parts is not None:
            weight_map = {k: v for m in parts for k, v in m.items()}
            index = {"metadata": engine.state_metadata(self.step), "weight_map": weight_map}
            self.dst.write_bytes(
                f"{self.rel_tensors}/{INDEX_FILE}", json.dumps(index, indent=2).encode()
            )
        if heads is None:
            heads = dict(self.parent.heads) if self.parent is not None else {}
            cid = info.checkpoints[-1].id
            if info.heads.get(cid):
                heads[cid] = _uri(self.dst, self.rel_heads)
            else:
                self.dst.delete_prefix(self.rel_heads)
        new = StateManifest(info=info, tensors=_uri(self.dst, self.rel_tensors), heads=heads)
        write_manifest(self.dst, new)
        self._drop_replaced(new)
        return new

    def _drop_replaced(self, new: StateManifest) -> None:
        """After an in-place update, remove the parent's tensors (they live under ``dst``)."""
        old = self.parent.tensors if self.parent is not None else None
        if self.parent_store is None or self.dst.uri != self.parent_store.uri:
            return
        if old and old != new.tensors:
            store, prefix = _store_for(old, self.dst)
            if store is self.dst:
                self.dst.delete_prefix(prefix.rstrip("/"))

    def abort(self) -> None:
        """Remove everything this step wrote under ``dst`` (nothing is committed)."""
        self.dst.delete_prefix(self.rel_tensors)
        self.dst.delete_prefix(self.rel_heads)


def with_params(src: ObjectStore, dst: ObjectStore, params: dict[str, Any]) -> ObjectStore:
    """A copy of ``src``'s manifest at ``dst`` with other method parameters (a candidate fold).

    The copy points at ``src``'s tensors, so nothing else is copied. Returns ``dst``.
    """
    m = read_manifest(src)
    write_manifest(dst, m.model_copy(update={"info": m.info.model_copy(update={"params": params})}))
    return dst


def fold_into(
    src: ObjectStore,
    dst: ObjectStore,
    base: OpenedCheckpoint | TensorReader,
    checkpoint: OpenedCheckpoint,
    *,
    checkpoint_id: str | None = None,
    digest: str | None = None,
    device: str | None = "cpu",
    max_shard_size: int = DEFAULT_SHARD,
    progress: bool = False,
    max_task_vector_ratio: float | None = None,
    stats: CheckpointStats | None = None,
    objective: Objective | None = None,
) -> StateManifest:
    """Fold one checkpoint into the state at ``src`` and commit the new state at ``dst``.

    ``dst`` may equal ``src`` (an in-place update). Nothing under ``dst`` changes if the
    fold fails, or if ``max_task_vector_ratio`` refuses the checkpoint (``engine.fold``).
    A method that reads statistics gets ``stats``, else the checkpoint's published
    ``mergeflow_stats.safetensors``; ``objective`` is for methods that learn. With the base
    opened (not a bare reader), vocabulary rows are aligned through the tokenizers.
    """
    manifest, fold = open_fold(src, base, checkpoint, checkpoint_id)
    if stats is None and engine.needs_statistics(manifest.info):
        stats = checkpoint.stats(fold.base)
    stats = fold.remap_stats(stats)
    write = StateWrite.begin(dst, manifest, src, max_shard_size)
    try:
        new_info = engine.fold(
            manifest.info,
            fold.state,
            fold.base,
            fold.checkpoint,
            checkpoint_id=checkpoint_id or checkpoint.uri,
            digest=digest or checkpoint.digest(),
            out=write.tensors(),
            heads_out=write.heads(),
            device=device,
            progress=progress,
            max_task_vector_ratio=max_task_vector_ratio,
            stats=stats,
            objective=objective,
        )
        vocab.save(dst, write.rel_tensors, fold, vocab_folder(src, manifest))
    except BaseException:
        write.abort()
        raise
    return write.commit(fold.record(new_info))


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
    folder = vocab_folder(store, manifest)
    base = vocab.export_base(manifest.info, base, folder, store.uri)
    export.export(manifest.info, state, base, out, dtype=dtype, device=device, progress=progress)
    return manifest.info


def summary(manifest: StateManifest) -> dict[str, Any]:
    """A small JSON-able description of a state (for `mergeflow state show`)."""
    i = manifest.info
    return {
        "method": i.method,
        "params": i.params,
        "step": i.step,
        "scale": i.scale,
        "scalars": i.scalars,
        "base": i.base.model_dump(),
        "projection": {
            "kind": i.projection.kind,
            "description": i.projection.description,
            "count": len(i.projection.projected),
        },
        "checkpoints": [c.model_dump(exclude_defaults=True) for c in i.checkpoints],
        "vocab": vocab.summary(i),
        "tensors": manifest.tensors,
        "heads": manifest.heads,
    }
