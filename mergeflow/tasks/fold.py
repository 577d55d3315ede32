"""Fold tasks: validate a checkpoint, fold it into a fresh state prefix, export merged weights."""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Sequence
from typing import Any

from prefect import task

from mergeflow.architecture import resolve_vocab
from mergeflow.errors import CheckpointChanged, CheckpointError
from mergeflow.lineage import LineageSpec
from mergeflow.merging.methods import get_continual
from mergeflow.merging.state import StateInfo
from mergeflow.storage import states, vocab
from mergeflow.storage.objects import ObjectStore, StoreSink
from mergeflow.storage.schemes import open_checkpoint
from mergeflow.storage.shard_writer import ShardedWriter
from mergeflow.storage.vocab_files import model_files
from mergeflow.tasks import layout
from mergeflow.tasks.calibration import checkpoint_stats, fold_objective
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import CheckpointRef, FoldOutput, ModelOutput, ParentState

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fold_source(
    parent: ParentState, params: dict[str, Any], prefix: str, method: str | None = None
) -> ObjectStore:
    """The state a fold reads: the parent's state of ``method`` (default: the parent's own),
    or (a candidate with other parameters) a copy of its manifest with those parameters at
    ``<prefix>/state``, still pointing at its tensors."""
    uri = parent.chain(method) if method else parent.state_uri
    src = layout.store(uri)
    held = parent.params if uri == parent.state_uri else states.read_manifest(src).info.params
    if dict(held) == params:
        return src
    return states.with_params(src, layout.store(layout.state_uri_of(prefix)), params)


def fold_output(
    label: str, prefix: str, info: StateInfo, seconds: float, stats_seconds: float = 0.0
) -> FoldOutput:
    """What a fold task returns about the state it committed at ``<prefix>/state``."""
    return FoldOutput(
        label=label,
        method=info.method,
        params=dict(info.params),
        prefix=prefix,
        state_uri=layout.state_uri_of(prefix),
        step=info.step,
        folded=tuple(c.id for c in info.checkpoints),
        seconds=seconds,
        stats_seconds=stats_seconds,
        peak_rss_mb=peak_rss_mb(),
    )


@task(name="validate-checkpoint", **io_task)
def validate_checkpoint(spec: LineageSpec, ck: CheckpointRef) -> CheckpointRef:
    """Open the checkpoint and check its vocabulary (through the tokenizers), names, shapes and
    dtypes against the base (headers only; the vocabulary tensors as the lineage's state has them).

    Raises :class:`~mergeflow.errors.CheckpointError` for a bad checkpoint (never retried).
    Fills in the digest when the caller did not give one.
    """
    base = layout.open_base(spec)
    checkpoint = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    init = layout.store(layout.init_state_uri(spec))
    v = (
        states.read_manifest(init).info.vocab
        if states.has_state(init)
        else resolve_vocab(base.reader, base.config)
    )
    vocab.check(v, spec.fold_options(), base, checkpoint)
    return ck if ck.digest else ck.model_copy(update={"digest": checkpoint.digest()})


@task(name="fold", task_run_name="fold-{ck.id}-{label}")
def fold_checkpoint(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    label: str,
    params: dict[str, Any],
    prefix: str,
    method: str | None = None,
) -> FoldOutput:
    """Fold ``ck`` into the parent's state of ``method`` (default: the lineage's) and commit
    the new state at ``<prefix>/state``.

    The parent state is never modified (see :func:`fold_source` for candidates). Statistics
    and the calibration objective are read for this candidate's method when it needs them.
    A task vector above the lineage's ``max_task_vector_ratio`` is refused
    (:class:`~mergeflow.errors.CheckpointError`) before anything is committed, from norms
    the fold sums as it reads (screening reads no tensor itself). A refusal of one of
    several candidates names it.
    """
    t0 = time.perf_counter()
    name = method or spec.method
    base = layout.open_base(spec)
    checkpoint = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    m = get_continual(name)
    try:
        stats, stats_s = (
            checkpoint_stats(spec, ck, checkpoint, base) if m.statistics else (None, 0.0)
        )
        objective = (
            fold_objective(spec, parent, ck, checkpoint, base, params)
            if m.needs_objective
            else None
        )
        new = states.fold_into(
            fold_source(parent, params, prefix, name),
            layout.store(layout.state_uri_of(prefix)),
            base,
            checkpoint,
            checkpoint_id=ck.id,
            digest=ck.digest or None,
            device=spec.device,
            max_task_vector_ratio=spec.max_task_vector_ratio,
            stats=stats,
            objective=objective,
        )
    except CheckpointChanged:
        raise
    except CheckpointError as e:
        if label == "main":
            raise
        raise CheckpointError(e.source, f"candidate {label} ({name}): {e.problem}") from e
    if line := vocab.note(new.info, ck.id):
        log.info("%s", line)
    return fold_output(label, prefix, new.info, time.perf_counter() - t0, stats_s)


@task(name="export-model", task_run_name="export-{fold.label}", **io_task)
def export_model(spec: LineageSpec, fold: FoldOutput) -> ModelOutput:
    """Write ``θ₀ + scale·state`` to ``<prefix>/model`` in the HF layout (base's config kept)."""
    t0 = time.perf_counter()
    base = layout.open_base(spec)
    model_uri = layout.model_uri_of(fold.prefix)
    out, st = layout.store(model_uri), layout.store(fold.state_uri)
    manifest = states.read_manifest(st)
    for name, data in model_files(manifest.info, base, states.vocab_folder(st, manifest)).items():
        out.write_bytes(name, data)  # the base's, or the grown vocabulary's tokenizer and config
    states.export_state(
        st, base.reader, ShardedWriter(StoreSink(out)), dtype=spec.export_dtype, device=spec.device
    )
    summary = states.summary(manifest) | {"lineage": spec.name}
    out.write_bytes("mergeflow.json", json.dumps(summary, indent=2, default=str).encode())
    return ModelOutput(model_uri=model_uri, seconds=time.perf_counter() - t0)


@task(name="discard-prefixes", **io_task)
def discard_prefixes(prefixes: Sequence[str]) -> None:
    """Delete step prefixes that will never be registered (a rejected or losing candidate)."""
    for p in prefixes:
        layout.store(p).delete_prefix("")
