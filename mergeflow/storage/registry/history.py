"""Editing a lineage's history: drop a checkpoint, supersede the folds replayed without it.

A lineage's versions form a history that can be edited after the fact
(``mergeflow lineage drop``). Nothing is deleted: edits change tags and descriptions.

- The dropped version gets ``mergeflow.status=dropped``, ``mergeflow.dropped.reason`` and
  ``mergeflow.dropped.at``. Its checkpoint stays in the seen set, so it is never folded again.
- Every version that built on it is replayed: first marked ``mergeflow.status=superseded``
  with ``mergeflow.superseded.reason`` and an empty ``mergeflow.superseded.by`` (a *pending*
  replay), then, once its replayed fold is registered (a new version tagged
  ``mergeflow.replaces.version``), linked to it through ``mergeflow.superseded.by``.

Pending marks are written before the drop mark and the replay follows them in version order,
so an interrupted drop resumes from the tags alone (:func:`pending_replays`,
:func:`replacement_of`). Only ``accepted`` and ``rejected`` versions are *live*
(:data:`~mergeflow.storage.registry.tags.LIVE_STATUSES`): aliases and parents ignore the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException

from mergeflow.errors import ConfigError
from mergeflow.storage.registry.client import Registry
from mergeflow.storage.registry.connection import mlflow_errors
from mergeflow.storage.registry.records import VersionRecord
from mergeflow.storage.registry.tags import (
    DROPPED,
    LIVE_STATUSES,
    SUPERSEDED,
    T_DROPPED_AT,
    T_DROPPED_REASON,
    T_STATUS,
    T_SUPERSEDED_BY,
    T_SUPERSEDED_REASON,
)

__all__ = [
    "find_checkpoint",
    "inherited_seen",
    "link_replacement",
    "mark_dropped",
    "mark_pending",
    "pending_replays",
    "plan_drop",
    "replacement_of",
]

_BANNER = ("**DROPPED**", "**SUPERSEDED**")
_MAX_DESCRIPTION = 4900


def _by_number(versions: Sequence[VersionRecord]) -> list[VersionRecord]:
    return sorted(versions, key=lambda v: int(v.version))


def find_checkpoint(versions: Sequence[VersionRecord], ref: str) -> VersionRecord:
    """The version that holds checkpoint ``ref`` (its id, digest or URI) now.

    Prefers a live version, then one whose replay is pending, then a dropped one (so
    dropping twice finds the first drop). Raises :class:`ConfigError` if none matches.
    """
    digest = ref if ref.startswith("sha256:") else f"sha256:{ref}"
    hits = [
        v
        for v in versions
        if ref in (v.checkpoint_id, v.checkpoint_uri) or digest == v.checkpoint_digest
    ]
    rank = {"accepted": 0, "rejected": 0, SUPERSEDED: 1, DROPPED: 2}
    hits = [v for v in hits if not (v.status == SUPERSEDED and v.superseded_by)]
    if not hits:
        known = ", ".join(dict.fromkeys(v.checkpoint_id for v in _by_number(versions))) or "none"
        raise ConfigError(
            f"no version holds checkpoint {ref!r} (give its id, digest or URI; known: {known})"
        )
    return min(hits, key=lambda v: (rank.get(v.status, 3), -int(v.version)))


def plan_drop(versions: Sequence[VersionRecord], target: VersionRecord) -> list[VersionRecord]:
    """The versions to replay without ``target``, in the order they were folded.

    Only an accepted version is ever a parent, so dropping a rejected one replays nothing.
    Otherwise: every live version registered after it that folded something (has a state,
    accepted or rejected by the gate, since its gate compared against a parent that held the
    dropped checkpoint). Versions rejected at validation never depended on a parent.
    """
    if target.status != "accepted":
        return []
    after = [v for v in versions if int(v.version) > int(target.version)]
    return _by_number([v for v in after if v.status in LIVE_STATUSES and v.state_uri])


def pending_replays(versions: Sequence[VersionRecord]) -> list[VersionRecord]:
    """Superseded versions whose replayed fold is not linked yet, oldest first."""
    return _by_number([v for v in versions if v.status == SUPERSEDED and not v.superseded_by])


def replacement_of(versions: Sequence[VersionRecord], version: str) -> VersionRecord | None:
    """The version registered as the replay of ``version``, if any."""
    found = [v for v in versions if v.replaces == str(version)]
    return _by_number(found)[-1] if found else None


def inherited_seen(versions: Sequence[VersionRecord], up_to: str) -> set[str]:
    """Ids and digests of the checkpoints of versions numbered up to ``up_to`` (a branch point)."""
    out: set[str] = set()
    for v in versions:
        if int(v.version) <= int(up_to):
            out |= v.held()
    return out


def _set(reg: Registry, model: str, v: VersionRecord, tags: dict[str, str], banner: str) -> None:
    """Set version tags (and the LoggedModel's), and put ``banner`` on top of the description."""
    with mlflow_errors(f"editing version {v.version} of {model!r}"):
        for key, value in tags.items():
            reg.client.set_model_version_tag(model, v.version, key, value)
        mv = reg.client.get_model_version(model, v.version)
        lines = (mv.description or "").splitlines()
        if lines and lines[0].startswith(_BANNER):
            lines = lines[2:] if len(lines) > 1 and not lines[1].strip() else lines[1:]
        text = "\n".join([banner, "", *lines])
        reg.client.update_model_version(model, v.version, description=text[:_MAX_DESCRIPTION])
    if v.model_id:
        try:  # keep the LoggedModel's copy of the tags in step; the version is what counts
            reg.client.set_logged_model_tags(v.model_id, tags)
        except MlflowException:
            pass


def mark_pending(reg: Registry, model: str, v: VersionRecord, reason: str) -> None:
    """Mark ``v`` superseded, its replay pending (``mergeflow.superseded.by`` empty)."""
    tags = {T_STATUS: SUPERSEDED, T_SUPERSEDED_BY: "", T_SUPERSEDED_REASON: reason}
    _set(reg, model, v, tags, f"**SUPERSEDED** (replay pending) · {reason}")


def link_replacement(reg: Registry, model: str, v: VersionRecord, by: str) -> None:
    """Record that version ``by`` replaced ``v`` (the end of one replayed step)."""
    tags = {T_STATUS: SUPERSEDED, T_SUPERSEDED_BY: str(by)}
    _set(reg, model, v, tags, f"**SUPERSEDED by version {by}** · {v.superseded_reason}")


def mark_dropped(reg: Registry, model: str, v: VersionRecord, reason: str) -> None:
    """Mark ``v`` dropped: never folded again, never a parent, off every alias."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {T_STATUS: DROPPED, T_DROPPED_REASON: reason, T_DROPPED_AT: at}
    _set(reg, model, v, tags, f"**DROPPED** on {at} · {reason}")
