"""Guards around a fold: screen a checkpoint before folding it, confirm nothing moved before committing.

- :func:`screen_checkpoint` runs right after validation (headers). It proves the checkpoint
  is still the one the source listed (:class:`~mergeflow.errors.CheckpointChanged`
  otherwise: skipped, listed again with its new digest) and refuses a ``config.json`` of
  another architecture or one that needs custom code. It reads no tensor: a task vector
  larger than the lineage's ``max_task_vector_ratio`` of the base is refused by the fold
  itself, from the norms it sums while reading, before it commits
  (:func:`mergeflow.tasks.fold.fold_checkpoint`). Refusals are
  :class:`~mergeflow.errors.CheckpointError`: the fold flow records a rejected version.
- :func:`confirm_commit` runs right before the version is registered, with the lineage
  lock held and fenced (:func:`mergeflow.flows.lock.fence`). MLflow has no
  compare-and-set, so it re-reads the registry: the fold's parent must still be the last
  accepted version and the checkpoint must not be registered yet
  (:class:`LineageMoved` otherwise), and the checkpoint's files must be unchanged.
"""

from __future__ import annotations

import hashlib

from prefect import task

from mergeflow.errors import CheckpointChanged, MergeflowError, StateError
from mergeflow.lineage import LineageSpec
from mergeflow.storage.schemes import open_checkpoint, open_source
from mergeflow.storage.screening import check_config
from mergeflow.storage.sources import StoreSource
from mergeflow.tasks import layout
from mergeflow.tasks.lineage import load_parent, registry
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import CheckpointRef, ParentState


class LineageMoved(StateError):
    """The lineage changed under a fold (its lock was lost): nothing was registered."""


def confirm_unchanged(ck: CheckpointRef) -> None:
    """Raise :class:`CheckpointChanged` if ``ck``'s files differ from when its source listed it.

    Checked for checkpoints of a folder or S3 source (one LIST); Hub checkpoints are pinned
    at a commit and cannot change; others have no listing to compare with.
    """
    if not ck.source or not ck.digest:
        return
    src = open_source(ck.source)
    if not isinstance(src, StoreSource):
        return
    now = src.current_digest(ck.id)
    if now != ck.digest:
        raise CheckpointChanged(
            ck.uri,
            f"its files changed since it was listed (digest {ck.digest[:19]}… is now "
            f"{(now or 'gone')[:19]}…); skipped, the new files are listed as a new checkpoint",
        )


@task(name="identify-checkpoint", **io_task)
def identify_checkpoint(ck: CheckpointRef) -> CheckpointRef:
    """``ck`` with a digest even when it cannot be opened: a broken checkpoint must still be
    recorded under its own digest (the registry keeps one version per digest).

    From a fresh listing of its parent folder or prefix (the digest ``watch`` would list),
    else ``uri:sha256(<uri>)``.
    """
    if ck.digest:
        return ck
    parent, _, name = ck.uri.rstrip("/").rpartition("/")
    digest = None
    try:
        src = open_source(parent) if parent else None
        if isinstance(src, StoreSource):
            digest = src.current_digest(name)
    except (MergeflowError, OSError):
        digest = None
    if digest is None:
        digest = "uri:" + hashlib.sha256(ck.uri.encode()).hexdigest()
    return ck.model_copy(update={"digest": digest})


@task(name="screen-checkpoint", **io_task)
def screen_checkpoint(spec: LineageSpec, ck: CheckpointRef) -> None:
    """Checks beyond the headers that read no tensor (module doc)."""
    confirm_unchanged(ck)
    base = layout.open_base(spec)
    checkpoint = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    check_config(base.config, checkpoint.config, ck.uri)


@task(name="confirm-commit", **io_task)
def confirm_commit(
    spec: LineageSpec, parent: ParentState, ck: CheckpointRef, replaying: bool = False
) -> None:
    """The compare half of compare-and-set, right before registering (module doc).

    ``replaying``: the fold replays a version after a dropped checkpoint
    (:mod:`mergeflow.flows.replay`), whose digest is registered already by design.
    """
    now = load_parent.fn(spec, replaying=replaying)
    if now.version != parent.version:
        raise LineageMoved(
            f"lineage {spec.name} moved on while {ck.id} was folded: it now builds on version "
            f"{now.version}, the fold built on {parent.version}; nothing was registered (the "
            "lock was lost); the next fold run folds it again on the new parent"
        )
    if not replaying and ck.digest:
        done = [
            v.version
            for v in registry().versions(spec.registered_model)
            if v.checkpoint_digest == ck.digest
        ]
        if done:
            raise LineageMoved(
                f"{ck.id} was registered as version {done[0]} of {spec.registered_model} while "
                "this run folded it; nothing was registered twice"
            )
    confirm_unchanged(ck)


@task(name="repair-aliases", **io_task)
def repair_aliases(spec: LineageSpec) -> None:
    """``newest`` and ``champion`` where the versions say: repairs a run that died between
    creating its version and moving the aliases (run first thing under the lineage lock)."""
    registry().reconcile_aliases(spec.registered_model)
