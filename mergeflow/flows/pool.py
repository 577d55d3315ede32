"""Pool merges in a lineage: a lineage whose method is a pool method (``fw_merging``, ``batch_adamerging``).

Such a lineage keeps, at each version, one pool merge of every checkpoint it accepted
(a *pool state*: the merged task vector, the pool's checkpoints with their URIs, their
heads). It does not fold:

- ``mergeflow lineage rebuild NAME --as NEW --method fw_merging`` merges the checkpoints NAME
  folded (the rebuild queue) as ONE pool merge (:func:`rebuild_pool`), on the calibration
  split of each one's task, then exports, evaluates, gates and registers it as NEW's first
  version, like a fold (:func:`mergeflow.flows.commit.commit`). Anything that stops the merge
  (a task without calibration data, a diverging run) refuses the rebuild: nothing is
  registered, and a rerun tries again;
- each checkpoint that arrives later (``fold_one``, so watch, backfill and replay alike) is
  merged together with the last accepted version's pool again (:func:`merge_pool_run`) and
  registered as the next version: time grows with the pool, memory does not (for a method
  that streams the pool, like ``fw_merging``). A refusal then is a rejected version of that
  checkpoint, and the next one merges with the last accepted pool.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.flows.commit import Merged, commit
from mergeflow.lineage import LineageSpec
from mergeflow.tasks import layout
from mergeflow.tasks.evaluate import evaluate_model
from mergeflow.tasks.fold import discard_prefixes, export_model, validate_checkpoint
from mergeflow.tasks.guard import identify_checkpoint, screen_checkpoint
from mergeflow.tasks.lineage import load_parent
from mergeflow.tasks.pool import merge_pool, pool_of
from mergeflow.tasks.values import CheckpointRef, FoldOutcome, ParentState


def merge_pool_run(spec: LineageSpec, parent: ParentState, cks: list[CheckpointRef]) -> Merged:
    """Merge the parent's pool plus ``cks`` (validated) into a fresh prefix, export and evaluate it.

    Raises :class:`~mergeflow.errors.CheckpointError` (after discarding the prefix) when the
    merge refuses the pool. Call inside a flow run."""
    pool = [*pool_of(parent), *cks]
    prefix = layout.new_prefix(spec, len(pool))
    try:
        fold = merge_pool(spec, parent, pool, prefix)
        model = export_model(spec, fold)
        ev = evaluate_model(spec, fold, model)
    except CheckpointError:
        discard_prefixes([prefix])
        raise
    main = spec.candidate_folds()
    return Merged(main, [prefix], [fold], [model], [ev], pool)


@flow(name="mergeflow-pool-merge", flow_run_name="{spec.name}-pool", log_prints=True)
def rebuild_pool(spec: LineageSpec, queue: list[CheckpointRef]) -> FoldOutcome:
    """``queue`` as one pool merge on top of the lineage's parent (see the module docstring).

    Call with the lineage's lock held. Raises :class:`~mergeflow.errors.ConfigError`, having
    registered nothing, when a checkpoint or the merge is refused."""
    log = get_run_logger()
    t0 = time.perf_counter()
    parent = load_parent(spec)
    cks = []
    try:
        for ck in queue:
            ck = validate_checkpoint(spec, identify_checkpoint(ck))
            screen_checkpoint(spec, ck)
            cks.append(ck)
        load_s = time.perf_counter() - t0
        log.info(f"{spec.name}: {spec.method} merge of a pool of {len(cks)} checkpoint(s)")
        merged = merge_pool_run(spec, parent, cks)
    except CheckpointError as e:  # CheckpointChanged too: the pool is not what was listed
        raise ConfigError(
            f"lineage {spec.name}: the {spec.method} merge of {[c.id for c in queue]} was "
            f"refused, nothing was registered: {e}"
        ) from None
    outcome = commit(spec, parent, cks[-1], merged, None, load_s)
    if outcome.version is None:
        raise ConfigError(
            f"lineage {spec.name}: the pool merge was not registered: {outcome.reason}"
        )
    return outcome
