"""IO tasks: load a lineage and the state a fold builds on, list sources, ask the registry."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergeflow.errors import MergeflowError
from mergeflow.lineage import LineageSpec, load_lineage
from mergeflow.tasks import layout
from mergeflow.tasks.models import CheckpointRef, ParentState

IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10]}


def not_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry IO failures, never errors the user caused (bad checkpoint, bad config)."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result is not a user error
            return True
    return not isinstance(exc, MergeflowError)


io_task = {**IO_RETRIES, "retry_condition_fn": not_user_error}


def registry() -> Any:
    from mergeflow.storage.registry import Registry

    return Registry()


@task(name="load-lineage", **io_task)
def load_spec(name: str) -> LineageSpec:
    """The lineage's spec from the catalog (Prefect Variable -> lineage.yaml on storage)."""
    return load_lineage(name)


@task(name="seen-checkpoints", **io_task)
def seen_checkpoints(spec: LineageSpec) -> set[str]:
    """Ids and digests of every checkpoint this lineage folded or rejected."""
    return set(registry().seen_checkpoints(spec.model_name))


@task(name="list-source", **io_task)
def list_source(uri: str) -> list[CheckpointRef]:
    """Complete checkpoints of one source, oldest publication first."""
    from mergeflow.storage.sources import source_from_uri

    return [
        CheckpointRef(id=c.id, uri=c.uri, digest=c.digest, published_at=c.published_at, source=uri)
        for c in source_from_uri(uri).list()
    ]


@task(name="load-parent", **io_task)
def load_parent(spec: LineageSpec) -> ParentState:
    """The last accepted version's state, or the step-0 state (created on first use)."""
    from mergeflow.storage import state_store

    last = registry().last_accepted(spec.model_name)
    state_uri = last.state_uri if last is not None else ensure_init_state(spec)
    manifest = state_store.read_manifest(layout.store(state_uri))
    matrix, validation, _ = layout.read_evaluation(layout.prefix_of(state_uri))
    return ParentState(
        version=last.version if last is not None else None,
        state_uri=state_uri,
        step=manifest.info.step,
        folded=tuple(c.id for c in manifest.info.checkpoints),
        params=dict(manifest.info.params),
        matrix=matrix,
        validation=validation,
    )


def ensure_init_state(spec: LineageSpec) -> str:
    """Create ``<storage>/init/state`` (method, params, base digest, projection rule) once."""
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef, FoldOptions
    from mergeflow.storage import state_store
    from mergeflow.storage.architecture import resolve_projection

    uri = layout.state_uri_of(layout.init_prefix(spec))
    st = layout.store(uri)
    if state_store.has_state(st):
        return uri
    base = layout.open_base(spec)
    info = engine.new_state(
        spec.method,
        spec.params,
        BaseRef(uri=base.uri, digest=base.digest()),
        resolve_projection(base.reader, base.config, spec.project_regex),
        FoldOptions(
            compute_dtype=spec.compute_dtype, missing="zero" if spec.allow_missing else "error"
        ),
    )
    state_store.init_state(st, info)
    return uri
