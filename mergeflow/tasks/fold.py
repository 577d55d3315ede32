"""Fold tasks: validate a checkpoint, fold it into a fresh state prefix, export merged weights."""

from __future__ import annotations

import json
import resource
import time
from typing import Any

from prefect import task

from mergeflow.lineage import LineageSpec
from mergeflow.tasks import layout
from mergeflow.tasks.io import io_task
from mergeflow.tasks.models import CheckpointRef, FoldOutput, ModelOutput, ParentState


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fold_options(spec: LineageSpec) -> Any:
    from mergeflow.merging.state import FoldOptions

    return FoldOptions(
        compute_dtype=spec.compute_dtype, missing="zero" if spec.allow_missing else "error"
    )


@task(name="validate-checkpoint", **io_task)
def validate_checkpoint(spec: LineageSpec, ck: CheckpointRef) -> CheckpointRef:
    """Open the checkpoint and check names, shapes and dtypes against the base (headers only).

    Raises :class:`~mergeflow.errors.CheckpointError` for a bad checkpoint (never retried).
    Fills in the digest when the caller did not give one.
    """
    from mergeflow.merging import engine
    from mergeflow.storage.checkpoints import open_checkpoint

    base = layout.open_base(spec)
    checkpoint = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    engine.check_compatible(base.reader, checkpoint.reader, _fold_options(spec))
    return ck if ck.digest else ck.model_copy(update={"digest": checkpoint.digest()})


@task(name="fold", task_run_name="fold-{ck.id}-{label}")
def fold_checkpoint(
    spec: LineageSpec,
    parent: ParentState,
    ck: CheckpointRef,
    label: str,
    params: dict[str, Any],
    prefix: str,
) -> FoldOutput:
    """Fold ``ck`` into the parent state and write the new state at ``<prefix>/state``.

    The parent state is never modified. A candidate with other parameters starts from a
    copy of the parent's manifest (pointing at the parent's tensors) with its parameters.
    """
    from mergeflow.storage import state_store
    from mergeflow.storage.checkpoints import open_checkpoint

    t0 = time.perf_counter()
    base = layout.open_base(spec)
    checkpoint = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    src, dst = layout.store(parent.state_uri), layout.store(layout.state_uri_of(prefix))
    if params != parent.params:
        m = state_store.read_manifest(src)
        tensors = m.tensors
        state_store.write_manifest(
            dst,
            m.model_copy(
                update={"info": m.info.model_copy(update={"params": params}), "tensors": tensors}
            ),
        )
        src = dst
    new = state_store.fold_checkpoint(
        src,
        dst,
        base.reader,
        checkpoint,
        checkpoint_id=ck.id,
        digest=ck.digest or None,
        device=spec.device,
    )
    return FoldOutput(
        label=label,
        params=dict(new.info.params),
        prefix=prefix,
        state_uri=layout.state_uri_of(prefix),
        step=new.info.step,
        folded=tuple(c.id for c in new.info.checkpoints),
        seconds=time.perf_counter() - t0,
        peak_rss_mb=peak_rss_mb(),
    )


@task(name="export-model", task_run_name="export-{fold.label}", **io_task)
def export_model(spec: LineageSpec, fold: FoldOutput) -> ModelOutput:
    """Write ``base + c·state`` to ``<prefix>/model`` in the HF layout (base's config.json kept)."""
    from mergeflow.storage import state_store
    from mergeflow.storage.safetensors_io import ShardedWriter
    from mergeflow.storage.store import StoreSink

    t0 = time.perf_counter()
    base = layout.open_base(spec)
    model_uri = layout.model_uri_of(fold.prefix)
    out, st = layout.store(model_uri), layout.store(fold.state_uri)
    for name in base.small_files():
        out.write_bytes(name, base.store.read_bytes(base.prefix + name))
    state_store.export_state(
        st, base.reader, ShardedWriter(StoreSink(out)), dtype=spec.export_dtype, device=spec.device
    )
    summary = state_store.summary(state_store.read_manifest(st)) | {"lineage": spec.name}
    out.write_bytes("mergeflow.json", json.dumps(summary, indent=2, default=str).encode())
    return ModelOutput(model_uri=model_uri, seconds=time.perf_counter() - t0)
