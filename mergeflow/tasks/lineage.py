"""Lineage tasks: load a spec, what it has seen, list its sources, the state a fold builds on."""

from __future__ import annotations

from prefect import task

from mergeflow.architecture import resolve_projection, resolve_vocab
from mergeflow.errors import StateError
from mergeflow.lineage import LineageSpec, load_lineage
from mergeflow.merging import engine
from mergeflow.merging.state import BaseRef
from mergeflow.storage import states
from mergeflow.storage.registry import Registry, VersionRecord
from mergeflow.storage.registry.history import inherited_seen, pending_replays
from mergeflow.storage.schemes import open_source
from mergeflow.tasks import layout
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import CheckpointRef, ParentState


def registry() -> Registry:
    """The MLflow registry of the environment (``MLFLOW_TRACKING_URI`` or the embedded stack)."""
    return Registry()


@task(name="load-lineage", **io_task)
def load_spec(name: str) -> LineageSpec:
    """The lineage's spec from the catalog (Prefect Variable -> lineage.yaml on its store)."""
    return load_lineage(name)


@task(name="seen-checkpoints", **io_task)
def seen_checkpoints(spec: LineageSpec) -> set[str]:
    """Ids and digests of every checkpoint this lineage folded, rejected or dropped.

    A branched or rebuilt lineage also counts what its origin had seen up to its version."""
    seen = set(registry().seen_checkpoints(spec.registered_model))
    if spec.origin is not None:
        origin = registry().versions(spec.origin.registered_model)
        seen |= inherited_seen(origin, spec.origin.version)
    return seen


@task(name="list-source", **io_task)
def list_source(uri: str) -> list[CheckpointRef]:
    """Complete checkpoints of one source, oldest publication first."""
    return [c.model_copy(update={"source": uri}) for c in open_source(uri).list()]


@task(name="checkpoint-by-uri", **io_task)
def checkpoint_by_uri(uri: str) -> CheckpointRef:
    """The checkpoint as its parent folder's source lists it (same id and digest as ``watch``)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    try:
        for c in open_source(parent).list():
            if c.id == name:
                return c.model_copy(update={"source": parent})
    except Exception:
        pass
    return CheckpointRef(id=name or uri, uri=uri)


@task(name="load-parent", **io_task)
def load_parent(spec: LineageSpec, replaying: bool = False) -> ParentState:
    """The last accepted version's state, or the step-0 state (created on first use), with
    the state of every candidate method (:func:`chain_states`).

    Raises :class:`StateError` while a replay (``mergeflow lineage drop``) is unfinished,
    unless ``replaying``: folding a new checkpoint first would reorder the history.
    """
    versions = registry().versions(spec.registered_model)
    if not replaying and pending_replays(versions):
        raise StateError(
            f"lineage {spec.name}: a replay after a dropped checkpoint is unfinished; "
            f"resume it with `mergeflow lineage resume {spec.name}` before folding more"
        )
    accepted = [v for v in versions if v.status == "accepted"]
    last = accepted[-1] if accepted else None
    chains = chain_states(spec, last)
    state_uri = last.state_uri if last is not None else next(iter(chains.values()))
    manifest = states.read_manifest(layout.store(state_uri))
    folded = tuple(c.id for c in manifest.info.checkpoints)
    for method, uri in chains.items():
        if uri == state_uri:
            continue
        held = tuple(c.id for c in states.read_manifest(layout.store(uri)).info.checkpoints)
        if held != folded:
            raise StateError(
                f"lineage {spec.name}: the {method} state at {uri} holds {list(held)}, the "
                f"lineage's holds {list(folded)}; every candidate method must fold the same checkpoints"
            )
    prefix = layout.prefix_of(state_uri) if last is not None else layout.init_prefix(spec)
    matrix, validation, _ = layout.read_evaluation(prefix)
    return ParentState(
        version=last.version if last is not None else None,
        state_uri=state_uri,
        step=manifest.info.step,
        folded=folded,
        params=dict(manifest.info.params),
        matrix=matrix,
        validation=validation,
        chains=chains,
    )


def chain_states(spec: LineageSpec, last: VersionRecord | None) -> dict[str, str]:
    """Method -> the state its candidates fold into next, for each of the lineage's methods.

    At the last accepted version, the states it kept for each method (its candidates'); before
    the first, each method's step-0 state. A method the version kept no state for (a candidate
    added to the spec since) is refused: its chain would miss the checkpoints folded so far.
    """
    methods = spec.chain_methods()
    if last is None:
        return {m: ensure_init_state(spec, m) for m in methods}
    held = last.chains() or {spec.method: last.state_uri}
    missing = [m for m in methods if m not in held]
    if missing:
        raise StateError(
            f"lineage {spec.name}: version {last.version} kept no state for candidate method(s) "
            f"{', '.join(missing)} (a chain of theirs would miss the {last.step} checkpoint(s) "
            f"folded so far); remove them from candidates, or refold the lineage with "
            f"`mergeflow lineage rebuild {spec.name} --as NEW --method {missing[0]}`"
        )
    return {m: held[m] for m in methods}


def ensure_init_state(spec: LineageSpec, method: str | None = None) -> str:
    """Create the step-0 state of ``method`` (default: the lineage's), once: method, params,
    base digest, projection rule, at :func:`~mergeflow.tasks.layout.init_state_uri` (a pool
    lineage's records its pool method: every version merges a pool from there)."""
    name = method or spec.method
    uri = layout.init_state_uri(spec, name)
    st = layout.store(uri)
    if states.has_state(st):
        return uri
    base = layout.open_base(spec)
    info = engine.new_state(
        name,
        spec.chain_params(name),
        BaseRef(uri=base.uri, digest=base.digest()),
        resolve_projection(base.reader, base.config, spec.project_regex),
        spec.fold_options(),
        resolve_vocab(base.reader, base.config),
    )
    states.init_state(st, info)
    return uri
