"""History tasks: drop a checkpoint, the replay queue, branch and rebuild starting points.

Each wraps one call of :mod:`mergeflow.storage.registry.history` or :mod:`mergeflow.storage.states`;
the flows in :mod:`mergeflow.flows.replay` order them under the lineage's lock.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from mergeflow.errors import ConfigError, StateError
from mergeflow.lineage import LineageSpec
from mergeflow.storage import states
from mergeflow.storage.registry import VersionRecord, history
from mergeflow.storage.registry.tags import DROPPED, LIVE_STATUSES
from mergeflow.tasks import layout
from mergeflow.tasks.lineage import registry
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import CheckpointRef, FoldOutcome

__all__ = [
    "DropResult",
    "ReplayItem",
    "ReplayStep",
    "drop_checkpoint",
    "link_replacement",
    "rebuild_queue",
    "replay_queue",
    "start_branch",
]


class DropResult(BaseModel):
    """What ``drop`` marked: the dropped version and the versions its replay replaces."""

    model_config = ConfigDict(frozen=True)

    version: str
    checkpoint_id: str
    already: bool
    """The checkpoint was dropped before (this call only resumes its replay)."""
    replays: tuple[str, ...]


class ReplayItem(BaseModel):
    """One pending step of a replay: the superseded version, its checkpoint, its replacement."""

    model_config = ConfigDict(frozen=True)

    version: str
    checkpoint: CheckpointRef
    replacement: str | None = None
    """Set when the replayed fold was registered before an interruption (link it only)."""


class ReplayStep(BaseModel):
    """One replayed step: the version it replaced and what the fold did."""

    model_config = ConfigDict(frozen=True)

    replaced: str
    outcome: FoldOutcome


def _ref(v: VersionRecord) -> CheckpointRef:
    return CheckpointRef(id=v.checkpoint_id, uri=v.checkpoint_uri, digest=v.checkpoint_digest)


@task(name="drop-checkpoint", **io_task)
def drop_checkpoint(spec: LineageSpec, checkpoint: str, reason: str) -> DropResult:
    """Mark the versions to replay superseded (pending), then the checkpoint's version dropped.

    Idempotent: a checkpoint dropped before is only reported (``already``). The pending
    marks come first, so a crash in between leaves a state that :func:`replay_queue` resumes.
    """
    if not reason.strip():
        raise ConfigError("say why the checkpoint is dropped (--reason TEXT)")
    reg, model = registry(), spec.registered_model
    versions = reg.versions(model)
    target = history.find_checkpoint(versions, checkpoint)
    if target.status == DROPPED:
        return DropResult(
            version=target.version, checkpoint_id=target.checkpoint_id, already=True, replays=()
        )
    plan = history.plan_drop(versions, target)
    why = f"replayed without {target.checkpoint_id} (version {target.version}, dropped: {reason})"
    for v in plan:
        history.mark_pending(reg, model, v, why)
    history.mark_dropped(reg, model, target, reason)
    reg.reconcile_aliases(model)
    return DropResult(
        version=target.version,
        checkpoint_id=target.checkpoint_id,
        already=False,
        replays=tuple(v.version for v in plan),
    )


@task(name="replay-queue", **io_task)
def replay_queue(spec: LineageSpec) -> list[ReplayItem]:
    """Every pending replay of the lineage, in the order its versions were folded."""
    versions = registry().versions(spec.registered_model)
    out = []
    for v in history.pending_replays(versions):
        done = history.replacement_of(versions, v.version)
        out.append(
            ReplayItem(
                version=v.version, checkpoint=_ref(v), replacement=done.version if done else None
            )
        )
    return out


@task(name="link-replacement", **io_task)
def link_replacement(spec: LineageSpec, version: str, by: str) -> None:
    """Tag ``version`` as superseded by ``by`` (one replayed step is done)."""
    reg = registry()
    v = next(v for v in reg.versions(spec.registered_model) if v.version == str(version))
    history.link_replacement(reg, spec.registered_model, v, by)


def resolve_version(versions: list[VersionRecord], ref: str) -> VersionRecord:
    """A version by number or alias (``champion``, ``newest``); a ConfigError otherwise."""
    for v in versions:
        if v.version == ref.removeprefix("v") or ref in v.aliases:
            return v
    known = ", ".join(v.version for v in versions) or "none"
    raise ConfigError(f"no version {ref!r} (versions: {known})")


@task(name="start-branch", **io_task)
def start_branch(origin: LineageSpec, version: str, new: LineageSpec) -> str:
    """Write ``new``'s starting states: ``origin``'s ``version`` state of each of ``new``'s
    methods (one, or each candidate method's of a portfolio), with ``new``'s parameters.

    Each ``init`` manifest points at the version's tensors (nothing is copied) and
    ``init/evaluation.json`` carries the version's scores, so the branch's first fold is gated
    against them. Returns the URI of the state of ``new``'s first method. Nothing of
    ``origin`` is written.
    """
    v = resolve_version(registry().versions(origin.registered_model), version)
    if not v.state_uri:
        raise ConfigError(
            f"{origin.name} version {v.version} has no state ({v.status} at validation: "
            f"{v.reason or 'no reason recorded'}); branch at a version that folded its checkpoint"
        )
    held = v.chains()
    missing = [m for m in new.chain_methods() if m not in held]
    if missing:
        raise ConfigError(
            f"{origin.name} version {v.version} kept no {', '.join(missing)} state "
            f"(it kept {', '.join(held)}); branch at a version that folded with every candidate method"
        )
    uris = [
        _branch_state(held[m], layout.init_state_uri(new, m), new.chain_params(m))
        for m in new.chain_methods()
    ]
    matrix, validation, test = layout.read_evaluation(layout.prefix_of(v.state_uri))
    doc = {"matrix": matrix.model_dump(mode="json"), "validation": validation, "test": test}
    layout.write_evaluation(
        layout.init_prefix(new), {**doc, "branch_of": v.model_dump(mode="json")}
    )
    return uris[0]


def _branch_state(src_uri: str, dst_uri: str, params: dict[str, Any]) -> str:
    """A manifest copy of the state at ``src_uri`` with ``params`` at ``dst_uri`` (redone as is)."""
    dst, src = layout.store(dst_uri), layout.store(src_uri)
    if states.has_state(dst):  # a branch interrupted before its lineage was saved is redone
        old, want = states.read_manifest(dst), states.read_manifest(src)
        if (old.tensors, old.info.params) != (want.tensors, params):
            raise StateError(f"{dst_uri} already holds a state; give the branch another --store")
    states.with_params(src, dst, params)
    return dst_uri


@task(name="rebuild-queue", **io_task)
def rebuild_queue(spec: LineageSpec) -> list[CheckpointRef]:
    """The checkpoints ``spec.origin`` folded (up to its version), in order, minus those ``spec``
    registered already (a resumed rebuild; a pool merge registers its whole pool at once).

    An origin that merges pools contributes each version's pool members it did not list yet,
    in pool order (from the version's state, which records their URIs)."""
    if spec.origin is None or spec.origin.kind != "rebuild":
        raise ConfigError(f"lineage {spec.name} is not a rebuild of another lineage")
    origin = registry().versions(spec.origin.registered_model)
    done = {d for v in registry().versions(spec.registered_model) for d in v.held()}
    out: list[CheckpointRef] = []
    for v in sorted(origin, key=lambda v: int(v.version)):
        if int(v.version) > int(spec.origin.version) or v.status not in LIVE_STATUSES:
            continue
        if not v.state_uri:
            continue
        for ck in _members(v) if v.pool else [_ref(v)]:
            if ck.digest not in done and all(ck.digest != c.digest for c in out):
                out.append(ck)
    return out


def _members(v: VersionRecord) -> list[CheckpointRef]:
    """The checkpoints a pool version merged, as its state records them."""
    info = states.read_manifest(layout.store(v.state_uri)).info
    return [CheckpointRef(id=c.id, uri=c.uri, digest=c.digest) for c in info.checkpoints]
