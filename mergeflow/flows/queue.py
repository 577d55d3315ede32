"""Pure helpers that decide what a lineage folds next (no Prefect, no IO; unit-tested)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from mergeflow.tasks.values import CheckpointRef


def order_pending(
    listings: Sequence[Sequence[CheckpointRef]], seen: Collection[str]
) -> list[CheckpointRef]:
    """Checkpoints of every source (``listings[i]`` is source ``i``'s) not folded or rejected yet.

    A checkpoint is seen when its id or digest is in ``seen``; one listed by two sources
    (same digest) counts once, at its first listing. Order: publication time, then the
    source's position in the spec, then id.
    """
    found: list[tuple[float, int, str, CheckpointRef]] = []
    digests: set[str] = set()
    for i, listing in enumerate(listings):
        for ck in listing:
            if ck.id in seen or ck.digest in seen or ck.digest in digests:
                continue
            digests.add(ck.digest)
            found.append((ck.published_at.timestamp() if ck.published_at else 0.0, i, ck.id, ck))
    found.sort(key=lambda t: t[:3])
    return [t[3] for t in found]


def target_index(
    pending: Sequence[CheckpointRef], checkpoint_id: str, uri: str = "", digest: str = ""
) -> int | None:
    """Where the checkpoint an event names sits in ``pending``: by digest, else by id (and URI)."""
    for i, ck in enumerate(pending):
        if (digest and ck.digest == digest) or (
            ck.id == checkpoint_id and (not uri or ck.uri == uri)
        ):
            return i
    return None


def first_uncovered(pending: Sequence[CheckpointRef], active: Collection[str]) -> int:
    """Index of the first pending checkpoint no queued or running fold covers.

    A fold run folds every pending checkpoint up to the one it targets, so everything up
    to the last targeted one (by id or digest in ``active``) is covered.
    """
    covered = max(
        (i for i, ck in enumerate(pending) if ck.digest in active or ck.id in active), default=-1
    )
    return covered + 1


def to_emit(pending: Sequence[CheckpointRef], active: Collection[str]) -> CheckpointRef | None:
    """The one checkpoint to emit a published event for: the newest pending one, unless a
    queued or running fold (``active``) already covers every pending checkpoint.

    One event is enough: its fold run folds every pending checkpoint up to it, in
    publication order. An event per checkpoint started a run per checkpoint, and all but
    the first found their work done (250 runs for 100 folds under load, docs/reliability.md).
    """
    if first_uncovered(pending, active) >= len(pending):
        return None
    return pending[-1]
