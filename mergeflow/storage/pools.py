"""A pool merge committed as a lineage state: ``D = θ̄ − θ₀`` (scale 1) over a pool of checkpoints.

A lineage whose method is a pool method (``fw_merging``, ``batch_adamerging``) keeps, at each
version, the state of one pool merge (:func:`mergeflow.merging.pool.pool_info`): its tensors
are the merged task vector, its checkpoints the pool in order with their URIs, and its heads
every member's. So exporting, evaluating and registering it are a fold's, and the next
checkpoint is merged together with the same pool again (:func:`merge_pool_into`). The
commit rule is a fold's (:class:`~mergeflow.storage.states.StateWrite`): ``state.json`` last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mergeflow.errors import StateError
from mergeflow.merging import engine
from mergeflow.merging.methods.base import Objective
from mergeflow.merging.pool import pool_delta, pool_info
from mergeflow.merging.state import FoldedCheckpoint
from mergeflow.storage import states, vocab
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.objects import ObjectStore

__all__ = ["PoolMember", "merge_pool_into"]


@dataclass(frozen=True)
class PoolMember:
    """One checkpoint of a pool: its id and digest in the lineage, and the opened checkpoint."""

    id: str
    digest: str
    checkpoint: OpenedCheckpoint


def merge_pool_into(
    src: ObjectStore,
    dst: ObjectStore,
    base: OpenedCheckpoint,
    members: Sequence[PoolMember],
    objective: Objective,
    *,
    params: dict[str, Any],
    device: str | None = "cpu",
    max_task_vector_ratio: float | None = None,
    log: Callable[[str], None] | None = None,
) -> states.StateManifest:
    """Merge ``members`` with the pool method of the state at ``src`` and commit the result at ``dst``.

    ``src`` is the lineage's parent: its step-0 state, or the last pool state (its
    members' heads are reused, and only the members it does not hold are screened against
    ``max_task_vector_ratio``, one more read each). Vocabulary rows are aligned by token, new
    tokens left out (recorded). Nothing under ``dst`` is committed unless the whole merge
    succeeded; a checkpoint the pool holds twice is refused (:class:`StateError`).
    """
    manifest = states.read_manifest(src)
    start = manifest.info
    ids = [m.id for m in members]
    digests = [m.digest for m in members if m.digest]
    if len(set(ids)) < len(ids) or len(set(digests)) < len(digests):
        raise StateError(f"the pool holds a checkpoint twice: {ids}")
    folds = [
        vocab.align(
            start.vocab, start.options.vocab, None, None, base, m.checkpoint, m.id, files=False
        )
        for m in members
    ]
    base_reader = folds[0].base if folds else base.reader
    readers = [f.checkpoint for f in folds]
    held = {c.digest for c in start.checkpoints if c.digest}
    if max_task_vector_ratio is not None:
        for m, r in zip(members, readers, strict=True):
            if m.digest not in held:
                engine.screen_task_vector_ratio(
                    base_reader, r, start.options, max_task_vector_ratio
                )
    p, delta, heads = pool_delta(
        start.method,
        params,
        base_reader,
        readers,
        objective,
        options=start.options,
        device=device,
        log=log,
        names=ids,
    )
    write = states.StateWrite(dst, len(members), parent=manifest, parent_store=src)
    write.abort()  # what a crashed attempt at this step left
    try:
        out = write.tensors()
        for k, d in delta.items():
            out.add(k, d.cpu())
        out.commit(engine.state_metadata(len(members)))
        del delta
        uris: dict[str, str] = {}
        for i, (m, r, h) in enumerate(zip(members, readers, heads, strict=True)):
            if not h:
                continue
            if m.id in manifest.heads and m.digest in held:
                uris[m.id] = manifest.heads[m.id]
                continue
            w, uris[m.id] = write.member_heads(i)
            for k in h:
                w.add(k, r.get(k))
            w.commit({"mergeflow.checkpoint": m.id})
        info = pool_info(
            start,
            p,
            [
                FoldedCheckpoint(id=m.id, digest=m.digest, step=i + 1, uri=m.checkpoint.uri)
                for i, m in enumerate(members)
            ],
            dict(zip(ids, heads, strict=True)),
            {m.id: f.new for m, f in zip(members, folds, strict=True)},
        )
        return write.commit(info, heads=uris)
    except BaseException:
        write.abort()
        raise
