"""Pool tasks: the pool a lineage merged last, and one pool merge into a fresh state prefix.

A lineage whose method is a pool method keeps a pool state at each version
(:mod:`mergeflow.storage.pools`); its next version merges that pool plus the new
checkpoint(s) again, so time grows with the pool while memory does not (for a method that
streams it, like ``fw_merging``).
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from mergeflow.errors import StateError
from mergeflow.lineage import LineageSpec
from mergeflow.storage import states
from mergeflow.storage.pools import PoolMember, merge_pool_into
from mergeflow.storage.schemes import open_checkpoint
from mergeflow.tasks import layout
from mergeflow.tasks.calibration import pool_objective
from mergeflow.tasks.fold import fold_output
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import CheckpointRef, FoldOutput, ParentState


@task(name="pool-of", **io_task)
def pool_of(parent: ParentState) -> list[CheckpointRef]:
    """The checkpoints the parent's pool state merged, in pool order (none at step 0)."""
    info = states.read_manifest(layout.store(parent.state_uri)).info
    lost = [c.id for c in info.checkpoints if not c.uri]
    if lost:
        raise StateError(
            f"the state at {parent.state_uri} records no URI for {lost}: it is not a pool state"
        )
    return [CheckpointRef(id=c.id, uri=c.uri, digest=c.digest) for c in info.checkpoints]


@task(name="merge-pool", task_run_name="merge-pool-{spec.name}")
def merge_pool(
    spec: LineageSpec, parent: ParentState, pool: list[CheckpointRef], prefix: str
) -> FoldOutput:
    """Merge ``pool`` with the lineage's pool method on its tasks' calibration data and commit
    the pool state at ``<prefix>/state`` (the method's progress goes to the run's log).

    A checkpoint the merge refuses (no calibration data, a task vector above the lineage's
    ``max_task_vector_ratio``, a diverging run) raises
    :class:`~mergeflow.errors.CheckpointError`; nothing is committed then.
    """
    t0 = time.perf_counter()
    log = get_run_logger()
    base = layout.open_base(spec)
    opened = [
        open_checkpoint(c.uri, base=base.reader, allow_pickle=spec.allow_pickle) for c in pool
    ]
    objective = pool_objective(spec, pool, opened, base)
    log.info(f"{spec.method}: merging a pool of {len(pool)} checkpoint(s)")
    new = merge_pool_into(
        layout.store(parent.state_uri),
        layout.store(layout.state_uri_of(prefix)),
        base,
        [PoolMember(c.id, c.digest or o.digest(), o) for c, o in zip(pool, opened, strict=True)],
        objective,
        params=dict(spec.params),
        device=spec.device,
        max_task_vector_ratio=spec.max_task_vector_ratio,
        log=lambda line: log.info(f"{spec.method}: {line}"),
    )
    return fold_output("main", prefix, new.info, time.perf_counter() - t0)
