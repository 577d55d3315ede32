"""What a data-informed fold needs from its lineage: the checkpoint's statistics and a calibration objective.

Statistics (methods that read them, e.g. ``regmean``, ``fisher``): the checkpoint's published
``mergeflow_stats.safetensors`` when it has one; otherwise computed from the calibration
split of the checkpoint's task and cached by checkpoint digest under the lineage's store,
``<store>/stats/<digest>.safetensors``. The objective (methods that learn, e.g.
``adamerging``) scores every task folded so far, the incoming one included, on its
calibration split; a pool merge's scores every task of its pool. Anything missing is a
:class:`~mergeflow.errors.CheckpointError`, so the fold registers a rejected version that
says what is missing (a rebuild refuses the pool); nothing falls back silently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from safetensors.torch import save

from mergeflow.errors import CheckpointError, ConfigError, ServiceUnavailable
from mergeflow.evaluation.calibration import build_objective
from mergeflow.evaluation.statistics import stats_for_checkpoint
from mergeflow.lineage import LineageSpec
from mergeflow.merging.engine import resolve_device
from mergeflow.merging.methods import get_pool, validate_params
from mergeflow.merging.methods.base import Objective
from mergeflow.merging.stats import STATS_FILE, CheckpointStats, check_stats
from mergeflow.storage import states
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.safetensors_file import SafetensorsReader
from mergeflow.tasks import layout
from mergeflow.tasks.values import CheckpointRef, ParentState

STATS_DIR = "stats"


def _calibration_uri(spec: LineageSpec, ck: CheckpointRef, what: str) -> str:
    """The calibration split of the checkpoint's own task, or a refusal saying what is missing."""
    tasks = [t for t in spec.evaluation.tasks if t.checkpoint == ck.id] if spec.evaluation else []
    if not tasks:
        raise CheckpointError(
            ck.uri, f"{what}, and the lineage's evaluation has no task for checkpoint {ck.id!r}"
        )
    uri = tasks[0].calibration_uri()
    if uri is None:
        raise CheckpointError(
            ck.uri, f"{what}, and task {tasks[0].name!r} has no calibration split"
        )
    return uri


def checkpoint_stats(
    spec: LineageSpec, ck: CheckpointRef, checkpoint: OpenedCheckpoint, base: OpenedCheckpoint
) -> tuple[CheckpointStats, float]:
    """The checkpoint's statistics (published, cached or computed now) and the seconds spent computing."""
    published = checkpoint.stats(base.reader)
    if published is not None:
        return published, 0.0
    store = layout.store(spec.store)
    key = f"{STATS_DIR}/{(ck.digest or 'unknown').replace(':', '-')}.safetensors"
    t0 = time.perf_counter()
    if not store.exists(key):
        uri = _calibration_uri(spec, ck, f"the checkpoint publishes no {STATS_FILE}")
        config = checkpoint.config or base.config
        if config is None:
            raise CheckpointError(
                ck.uri, "no config.json to build the model that computes its statistics"
            )
        try:
            tensors, metadata = stats_for_checkpoint(
                config,
                {k: checkpoint.reader.get(k) for k in checkpoint.reader.keys()},
                [(uri, layout.read_uri(uri))],
                device=str(resolve_device(spec.device)),
                source=ck.uri,
            )
        except ServiceUnavailable:
            raise
        except ConfigError as e:
            raise CheckpointError(ck.uri, f"its statistics cannot be computed: {e}") from None
        store.write_bytes(key, save(tensors, metadata))
    reader = SafetensorsReader(store.byte_source(key), f"{spec.store}/{key}")
    return (
        check_stats(reader, reader.metadata, base.reader, checkpoint.reader),
        time.perf_counter() - t0,
    )


def fold_objective(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    checkpoint: OpenedCheckpoint,
    base: OpenedCheckpoint,
    params: dict[str, Any],
) -> Objective:
    """The calibration objective over every task folded so far plus the checkpoint's own."""
    if spec.evaluation is None:
        raise CheckpointError(ck.uri, "a learning method needs the lineage's evaluation tasks")
    st = layout.store(parent.state_uri)
    manifest = states.read_manifest(st)
    heads: dict[str, dict[str, Any]] = {}
    for cid in parent.folded:
        r = states.heads_reader(st, manifest, cid)
        heads[cid] = {k: r.get(k) for k in r.keys()} if r is not None else {}
    own = set(checkpoint.reader.keys()) - set(base.reader.keys())
    heads[ck.id] = {k: checkpoint.reader.get(k) for k in own}
    try:
        return build_objective(
            spec.evaluation,
            base.config or {},
            heads,
            (*parent.folded, ck.id),
            read_bytes=layout.read_uri,
            device=str(resolve_device(spec.device)),
            batch_size=int(params.get("batch_size", 32)),
            seed=int(params.get("seed", 0)),
            loss=params.get("loss", "auto"),
        )
    except ServiceUnavailable:
        raise
    except ConfigError as e:
        raise CheckpointError(ck.uri, f"the calibration objective cannot be built: {e}") from None


def check_pool_calibration(spec: LineageSpec, pool: Sequence[CheckpointRef]) -> None:
    """Every task of the pool's checkpoints names a calibration split, or a
    :class:`~mergeflow.errors.CheckpointError` naming the first task without one."""
    what = f"method {spec.method!r} learns from calibration data"
    if spec.evaluation is None:
        raise CheckpointError(pool[-1].uri, f"{what}, and the lineage has no evaluation tasks")
    for ck in pool:
        for t in spec.evaluation.tasks:
            if t.checkpoint == ck.id and t.calibration_uri() is None:
                raise CheckpointError(
                    ck.uri, f"{what}, and task {t.name!r} has no calibration split"
                )


def pool_objective(
    spec: LineageSpec,
    pool: Sequence[CheckpointRef],
    opened: Sequence[OpenedCheckpoint],
    base: OpenedCheckpoint,
) -> Objective:
    """The calibration objective of a pool merge: every task of the pool's checkpoints, each
    with its checkpoint's head, as the lineage's pool method asks (examples, seed, loss).

    A task of the pool without a calibration split refuses the checkpoint it belongs to
    (:class:`~mergeflow.errors.CheckpointError` naming the task); a checkpoint without any
    task is merged all the same (it only enters through the method's choice)."""
    check_pool_calibration(spec, pool)
    assert spec.evaluation is not None
    keys = set(base.reader.keys())
    heads = {
        ck.id: {k: o.reader.get(k) for k in o.reader.keys() if k not in keys}
        for ck, o in zip(pool, opened, strict=True)
    }
    pm = get_pool(spec.method)
    o = pm.objective_options(validate_params(pm, spec.params))
    try:
        return build_objective(
            spec.evaluation,
            base.config or {},
            heads,
            tuple(heads),
            read_bytes=layout.read_uri,
            device=str(resolve_device(spec.device)),
            batch_size=o.batch_size,
            seed=o.seed,
            loss=o.loss,
        )
    except ServiceUnavailable:
        raise
    except ConfigError as e:
        raise CheckpointError(
            pool[-1].uri, f"the calibration objective cannot be built: {e}"
        ) from None
