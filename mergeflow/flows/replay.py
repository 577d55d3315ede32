"""Replay flows: drop a checkpoint and refold what came after it; rebuild with another method.

``mergeflow-replay`` (``mergeflow lineage drop|resume``) holds the lineage's lock
(:func:`mergeflow.flows.lock.lineage_lock`: the same global concurrency limit
``mergeflow-fold-<lineage>`` as the fold flow) for the whole run and fences every edit:

1. (with a checkpoint) mark every version that built on it *superseded, replay pending*,
   then the checkpoint's version *dropped* (tags only; see
   :mod:`mergeflow.storage.registry.history`); aliases move to the live versions;
2. replay the pending versions in their original order: each checkpoint is folded again by
   the fold path itself (``fold_one(..., replaces=<version>)``) on top of the last accepted
   live version, which is the state of the step before the dropped one for the first, then
   registered as a new version tagged ``mergeflow.replaces.version``, and the old version is
   linked to it (``mergeflow.superseded.by``). ``champion`` moves with each registration.

The fold is deterministic and starts from the same parent, so the replayed tensors equal,
bit for bit, those of a lineage that never saw the dropped checkpoint. An interrupted replay
resumes from the tags: a rerun (or ``mergeflow-replay`` without a checkpoint) links a step
whose version was registered and refolds the others; new folds of the lineage are refused
until then (``load_parent``). A progress artifact and one log line per step show progress.

``mergeflow-rebuild`` refolds the checkpoints of the lineage a rebuilt lineage came from
(``origin``), in the same order, with the rebuilt lineage's method, under its lock; with a
pool method it merges them all as one pool (:func:`mergeflow.flows.pool.rebuild_pool`).
"""

from __future__ import annotations

from typing import cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from mergeflow.errors import StateError
from mergeflow.flows.fold import fold_one
from mergeflow.flows.lock import fence, lineage_lock, reap_crashed_run
from mergeflow.flows.pool import rebuild_pool
from mergeflow.tasks.lineage import load_spec
from mergeflow.tasks.replay import (
    DropResult,
    ReplayStep,
    drop_checkpoint,
    link_replacement,
    rebuild_queue,
    replay_queue,
)
from mergeflow.tasks.values import FoldOutcome


def _progress(lineage: str, what: str, total: int) -> UUID | None:
    if not total:
        return None
    artifact = create_progress_artifact(
        progress=0.0, key=f"{what}-{lineage}", description=f"{what} of {lineage}: {total} step(s)"
    )
    return cast(UUID, artifact)  # sync call: the id itself


@flow(
    name="mergeflow-replay",
    flow_run_name="replay-{lineage}",
    log_prints=True,
    on_crashed=[reap_crashed_run],
)
def replay_flow(lineage: str, checkpoint: str = "", reason: str = "") -> list[ReplayStep]:
    """Drop ``checkpoint`` (id, digest or URI; empty: resume only) and replay what built on it.

    Returns the replayed steps, resumed ones included; see the module docstring.
    """
    log = get_run_logger()
    spec = load_spec(lineage)
    with lineage_lock(spec):
        if checkpoint:
            fence(spec)
            dropped: DropResult = drop_checkpoint(spec, checkpoint, reason)
            log.info(
                f"{dropped.checkpoint_id} (version {dropped.version}) "
                f"{'was already dropped' if dropped.already else 'dropped'}; "
                f"replaying version(s) {', '.join(dropped.replays) or '-'}"
            )
        queue = replay_queue(spec)
        artifact = _progress(lineage, "replay", len(queue))
        steps = []
        for i, item in enumerate(queue, 1):
            if item.replacement is None:
                outcome = fold_one(spec, item.checkpoint, replaces=item.version)
            else:  # registered before an interruption: only the link is missing
                outcome = FoldOutcome(
                    checkpoint_id=item.checkpoint.id, status="resumed", version=item.replacement
                )
            if outcome.version is None:  # skipped: the checkpoint moved; stays pending
                raise StateError(
                    f"replaying version {item.version}: {item.checkpoint.id} was not folded "
                    f"({outcome.reason}); fix it and run `mergeflow lineage resume {lineage}`"
                )
            fence(spec)
            link_replacement(spec, item.version, outcome.version)
            steps.append(ReplayStep(replaced=item.version, outcome=outcome))
            log.info(
                f"replay {i}/{len(queue)}: {item.checkpoint.id} {outcome.status} as version "
                f"{outcome.version}, replacing version {item.version}"
            )
            if artifact is not None:
                update_progress_artifact(artifact, progress=100.0 * i / len(queue))
        return steps


@flow(
    name="mergeflow-rebuild",
    flow_run_name="rebuild-{lineage}",
    log_prints=True,
    on_crashed=[reap_crashed_run],
)
def rebuild_flow(lineage: str) -> list[FoldOutcome]:
    """Refold the origin's checkpoints into the rebuilt ``lineage``, in order (resumable), or
    merge them as one pool when its method is a pool method."""
    log = get_run_logger()
    spec = load_spec(lineage)
    with lineage_lock(spec):
        queue = rebuild_queue(spec)
        if spec.method_kind == "pool" and queue:  # one merge of the whole queue
            artifact = _progress(lineage, "rebuild", 1)
            out = [rebuild_pool(spec, queue)]
            log.info(f"rebuild: a pool of {len(queue)} {out[0].status} as version {out[0].version}")
            if artifact is not None:
                update_progress_artifact(artifact, progress=100.0)
            return out
        artifact = _progress(lineage, "rebuild", len(queue))
        out = []
        for i, ck in enumerate(queue, 1):
            out.append(fold_one(spec, ck))
            log.info(f"rebuild {i}/{len(queue)}: {ck.id} {out[-1].status}")
            if artifact is not None:
                update_progress_artifact(artifact, progress=100.0 * i / len(queue))
        return out
