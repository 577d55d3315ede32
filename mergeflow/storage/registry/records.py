"""What a fold registers (:class:`FoldRecord`), what a version reads back (:class:`VersionRecord`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergeflow.errors import MergeflowError
from mergeflow.storage.registry.tags import (
    DROPPED,
    SUPERSEDED,
    T_CANDIDATES,
    T_CHECKPOINT_DIGEST,
    T_CHECKPOINT_ID,
    T_CHECKPOINT_URI,
    T_DROPPED_AT,
    T_DROPPED_REASON,
    T_LINEAGE,
    T_METHOD,
    T_METRICS,
    T_MODEL_ID,
    T_MODEL_URI,
    T_PARENT_VERSION,
    T_POOL,
    T_REASON,
    T_REPLACES_VERSION,
    T_STATE_URI,
    T_STATUS,
    T_STEP,
    T_SUPERSEDED_BY,
    T_SUPERSEDED_REASON,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "CandidateRecord",
    "FoldRecord",
    "PoolMember",
    "RegistryError",
    "VersionRecord",
    "aliases_of",
    "candidates_tag",
    "created_at",
    "finite_metrics",
    "parse_candidates",
    "parse_pool",
    "pool_tag",
    "run_params",
    "version_from_mlflow",
    "version_tags",
]

_MAX_PARAM_VALUE = 6000
_MAX_REASON = 4000
_MAX_TAG = 8000


class RegistryError(MergeflowError):
    """The tracking server refused a request or holds something mergeflow cannot use."""


class CandidateRecord(BaseModel):
    """One candidate of a fold that tried several: its method, state and validation scores."""

    model_config = ConfigDict(frozen=True)

    label: str
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    state_uri: str = ""
    """Its new state when it continues its method's state chain (the best of that method's
    candidates); "" when it was discarded."""
    validation: dict[str, float] = Field(default_factory=dict)


def candidates_tag(candidates: Sequence[CandidateRecord]) -> str:
    """The ``mergeflow.candidates`` tag: compact JSON, one object per candidate (without the
    per-task scores if it would not fit a tag; ``candidate/<label>/val/avg`` has their mean)."""
    docs = [c.model_dump(mode="json") for c in candidates]
    text = json.dumps(docs, sort_keys=True, separators=(",", ":"))
    if len(text) > _MAX_TAG:
        docs = [{**d, "validation": {}} for d in docs]
        text = json.dumps(docs, sort_keys=True, separators=(",", ":"))
    return text


def parse_candidates(text: str) -> list[CandidateRecord]:
    """The candidates of a ``mergeflow.candidates`` tag ([] when absent or unreadable)."""
    try:
        return [CandidateRecord.model_validate(c) for c in json.loads(text or "[]")]
    except (ValueError, TypeError):
        return []


class PoolMember(BaseModel):
    """One checkpoint of a pool merge's pool (``mergeflow.pool``)."""

    model_config = ConfigDict(frozen=True)

    id: str
    uri: str = ""
    digest: str = ""


def pool_tag(pool: Sequence[PoolMember]) -> str:
    """The ``mergeflow.pool`` tag: compact JSON, one object per checkpoint (ids and digests
    only if it would not fit a tag, ids only if even that would not)."""
    docs = [m.model_dump(mode="json") for m in pool]
    for drop in ((), ("uri",), ("uri", "digest")):
        text = json.dumps(
            [{k: v for k, v in d.items() if k not in drop} for d in docs], separators=(",", ":")
        )
        if len(text) <= _MAX_TAG:
            break
    return text


def parse_pool(text: str) -> list[PoolMember]:
    """The checkpoints of a ``mergeflow.pool`` tag ([] when absent or unreadable)."""
    try:
        return [PoolMember.model_validate(m) for m in json.loads(text or "[]")]
    except (ValueError, TypeError):
        return []


class FoldRecord(BaseModel):
    """Everything one fold registers (see the package doc for where each field goes)."""

    model_config = ConfigDict(frozen=True)

    lineage: str
    registered_model: str
    step: int = Field(ge=0)
    checkpoint_id: str
    checkpoint_uri: str
    checkpoint_digest: str
    parent_version: str | None
    """The version this fold built on (the last accepted one); None for the first fold."""
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    base_uri: str
    state_uri: str
    """URI of the new state prefix (``state.json`` inside); "" when nothing was written."""
    model_uri: str
    """URI of the merged weights folder (HF layout, on S3); "" when rejected at validation."""
    status: Literal["accepted", "rejected"]
    reason: str = ""
    """Gate reason or validation error."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """``test/<task>``, ``test/avg``, ``test/bwt``, ``val/<task>``, ``val/avg``, ``fold_seconds``..."""
    accuracy_matrix: list[list[float | None]] = Field(default_factory=list)
    """a_i(θ̄_j) for the heatmap: rows tasks i, columns steps j."""
    task_names: list[str] = Field(default_factory=list)
    eval_datasets: list[dict[str, Any]] = Field(default_factory=list)
    """For ``log_inputs``: ``{name, uri, split, digest}`` each (digest optional)."""
    replaces: str | None = None
    """A replayed fold: the version it replaces (part of the idempotency key with the digest)."""
    candidates: list[CandidateRecord] = Field(default_factory=list)
    """Every candidate when the fold tried several (the registered one's ``state_uri`` is
    this record's); empty otherwise."""
    pool: list[PoolMember] = Field(default_factory=list)
    """A pool merge: every checkpoint merged, in pool order (``checkpoint_*`` name the newest);
    empty for a fold."""


class VersionRecord(BaseModel):
    """One registered version as mergeflow reads it back from its tags."""

    model_config = ConfigDict(frozen=True)

    version: str
    step: int
    status: str
    checkpoint_id: str
    checkpoint_digest: str
    parent_version: str | None
    state_uri: str
    model_uri: str
    metrics: dict[str, float]
    run_id: str | None
    aliases: list[str]
    # Additions to the contract (all defaulted):
    checkpoint_uri: str = ""
    reason: str = ""
    method: str = ""
    lineage: str = ""
    model_id: str | None = None
    created_at: datetime | None = None
    # History edits (``mergeflow lineage drop``), all defaulted:
    replaces: str | None = None
    superseded_by: str | None = None
    superseded_reason: str = ""
    dropped_reason: str = ""
    dropped_at: str = ""
    # A fold that tried several candidates (``mergeflow.candidates``), defaulted:
    candidates: list[CandidateRecord] = Field(default_factory=list)
    # A pool merge (``mergeflow.pool``), defaulted:
    pool: list[PoolMember] = Field(default_factory=list)

    @property
    def note(self) -> str:
        """One line on how the version was edited ("" for an ordinary one), for tables."""
        if self.status == DROPPED:
            return f"dropped: {self.dropped_reason}"
        if self.status == SUPERSEDED:
            by = f"by version {self.superseded_by}" if self.superseded_by else "replay pending"
            return f"superseded {by}: {self.superseded_reason}"
        return f"replaces version {self.replaces}" if self.replaces else ""

    def held(self) -> set[str]:
        """Ids and digests of the checkpoints the version recorded: its own, and its pool's."""
        refs = [(self.checkpoint_id, self.checkpoint_digest)]
        refs += [(m.id, m.digest) for m in self.pool]
        return {x for ref in refs for x in ref if x}

    def chains(self) -> dict[str, str]:
        """Method -> the state its next fold continues: the kept candidate states, or the
        version's own state when it tried one candidate ({} when nothing was folded)."""
        kept = {c.method: c.state_uri for c in self.candidates if c.state_uri}
        if kept:
            return kept
        return {self.method: self.state_uri} if self.state_uri else {}


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics MLflow can store: finite floats only."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _flatten(params: Mapping[str, Any], prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name))
        else:
            text = (
                value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            )
            out[name] = text[:_MAX_PARAM_VALUE]
    return out


def run_params(rec: FoldRecord) -> dict[str, str]:
    """Run and LoggedModel params: ``method``, ``param.<k>`` (flattened), ``base``, ``checkpoint``
    (and ``pool``, the pool's ids, for a pool merge); with candidates ``candidate.<label>.method`` and ``candidate.<label>.param.<k>``."""
    return {
        "method": rec.method,
        **_flatten(rec.params, "param"),
        "base": rec.base_uri[:_MAX_PARAM_VALUE],
        "checkpoint": rec.checkpoint_uri[:_MAX_PARAM_VALUE],
        **({"pool": ",".join(m.id for m in rec.pool)[:_MAX_PARAM_VALUE]} if rec.pool else {}),
        **{f"candidate.{c.label}.method": c.method for c in rec.candidates},
        **{
            k: v
            for c in rec.candidates
            for k, v in _flatten(c.params, f"candidate.{c.label}.param").items()
        },
    }


def version_tags(rec: FoldRecord, model_id: str) -> dict[str, str]:
    """The version's tags (also on its LoggedModel); :func:`version_from_mlflow` reads them."""
    return {
        T_LINEAGE: rec.lineage,
        T_STEP: str(rec.step),
        T_CHECKPOINT_ID: rec.checkpoint_id,
        T_CHECKPOINT_URI: rec.checkpoint_uri,
        T_CHECKPOINT_DIGEST: rec.checkpoint_digest,
        T_PARENT_VERSION: rec.parent_version or "",
        T_STATE_URI: rec.state_uri,
        T_MODEL_URI: rec.model_uri,
        T_STATUS: rec.status,
        T_REASON: rec.reason[:_MAX_REASON],
        T_METHOD: rec.method,
        T_METRICS: json.dumps(finite_metrics(rec.metrics), sort_keys=True, separators=(",", ":")),
        T_MODEL_ID: model_id,
        **({T_REPLACES_VERSION: rec.replaces} if rec.replaces else {}),
        **({T_CANDIDATES: candidates_tag(rec.candidates)} if rec.candidates else {}),
        **({T_POOL: pool_tag(rec.pool)} if rec.pool else {}),
    }


def created_at(ms: int | None) -> datetime | None:
    """An MLflow timestamp (milliseconds) as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def aliases_of(version: str, aliases: Mapping[str, str]) -> list[str]:
    """The aliases (sorted) that point at ``version`` in an alias -> version map."""
    return sorted(a for a, v in aliases.items() if str(v) == str(version))


def version_from_mlflow(mv: ModelVersion, aliases: Mapping[str, str]) -> VersionRecord:
    """Read a model version back from its tags (missing tags read as empty)."""
    tags = dict(mv.tags or {})
    try:
        metrics = {k: float(v) for k, v in json.loads(tags.get(T_METRICS) or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        metrics = {}
    step_text = tags.get(T_STEP, "")
    return VersionRecord(
        version=str(mv.version),
        step=int(step_text) if step_text.lstrip("-").isdigit() else 0,
        status=tags.get(T_STATUS, ""),
        checkpoint_id=tags.get(T_CHECKPOINT_ID, ""),
        checkpoint_digest=tags.get(T_CHECKPOINT_DIGEST, ""),
        parent_version=tags.get(T_PARENT_VERSION) or None,
        state_uri=tags.get(T_STATE_URI, ""),
        model_uri=tags.get(T_MODEL_URI, ""),
        metrics=metrics,
        run_id=mv.run_id or None,
        aliases=aliases_of(str(mv.version), aliases),
        checkpoint_uri=tags.get(T_CHECKPOINT_URI, ""),
        reason=tags.get(T_REASON, ""),
        method=tags.get(T_METHOD, ""),
        lineage=tags.get(T_LINEAGE, ""),
        model_id=getattr(mv, "model_id", None) or tags.get(T_MODEL_ID) or None,
        created_at=created_at(mv.creation_timestamp),
        replaces=tags.get(T_REPLACES_VERSION) or None,
        superseded_by=tags.get(T_SUPERSEDED_BY) or None,
        superseded_reason=tags.get(T_SUPERSEDED_REASON, ""),
        dropped_reason=tags.get(T_DROPPED_REASON, ""),
        dropped_at=tags.get(T_DROPPED_AT, ""),
        candidates=parse_candidates(tags.get(T_CANDIDATES, "")),
        pool=parse_pool(tags.get(T_POOL, "")),
    )
