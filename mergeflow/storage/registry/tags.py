"""The names mergeflow writes to MLflow, in one place: version tags, aliases, metric keys.

Tags use dotted namespaces under ``mergeflow.``; every value is a string. Metric keys
are ``<split>/<task>`` and ``<split>/avg`` (plus ``test/bwt``); timings and memory keep
plain names (``fold_seconds``, ``peak_rss_mb``, ...).
"""

from __future__ import annotations

__all__ = [
    "CHAMPION_ALIAS",
    "DROPPED",
    "LIVE_STATUSES",
    "MLFLOW_EXTERNAL",
    "MLFLOW_NOTE",
    "NEWEST_ALIAS",
    "SUPERSEDED",
    "TAG_PREFIX",
    "TEST_AVG",
    "TEST_BWT",
    "TEST_PREFIX",
    "T_CANDIDATES",
    "T_CHECKPOINT_DIGEST",
    "T_CHECKPOINT_ID",
    "T_CHECKPOINT_URI",
    "T_DROPPED_AT",
    "T_DROPPED_REASON",
    "T_LINEAGE",
    "T_METHOD",
    "T_METRICS",
    "T_MODEL_ID",
    "T_MODEL_URI",
    "T_PARENT_VERSION",
    "T_POOL",
    "T_REASON",
    "T_REPLACES_VERSION",
    "T_STATE_URI",
    "T_STATUS",
    "T_STEP",
    "T_SUPERSEDED_BY",
    "T_SUPERSEDED_REASON",
    "VERSION_TAGS",
]

# ------------------------------------------------------------------------ aliases
CHAMPION_ALIAS = "champion"
"""On the newest accepted version; never on a rejected one."""
NEWEST_ALIAS = "newest"
"""On the newest version (accepted or rejected). MLflow reserves ``latest`` for itself."""

# --------------------------------------------------------------------------- tags
TAG_PREFIX = "mergeflow."
T_LINEAGE = TAG_PREFIX + "lineage"
"""The lineage name (also on the registered model, the experiment and the runs)."""
T_STEP = TAG_PREFIX + "step"
"""Checkpoints folded into the chain so far, this one included (decimal)."""
T_STATUS = TAG_PREFIX + "status"
"""``accepted`` or ``rejected``; later ``dropped`` or ``superseded`` (see :data:`LIVE_STATUSES`)."""
T_REASON = TAG_PREFIX + "reason"
"""Gate reason or validation error ("" when accepted)."""
T_METHOD = TAG_PREFIX + "method"
"""The merge method's name (with candidates: the method of the one registered)."""
T_METRICS = TAG_PREFIX + "metrics"
"""Compact JSON of the finite metrics, so listing versions needs one search call."""
T_CHECKPOINT_ID = TAG_PREFIX + "checkpoint.id"
T_CHECKPOINT_URI = TAG_PREFIX + "checkpoint.uri"
T_CHECKPOINT_DIGEST = TAG_PREFIX + "checkpoint.digest"
"""The idempotency key: one version per checkpoint digest."""
T_PARENT_VERSION = TAG_PREFIX + "parent.version"
"""The version this fold built on ("" for the first fold)."""
T_STATE_URI = TAG_PREFIX + "state.uri"
"""The new state prefix ("" when nothing was written)."""
T_MODEL_URI = TAG_PREFIX + "model.uri"
"""The merged weights folder ("" when rejected at validation)."""
T_MODEL_ID = TAG_PREFIX + "model.id"
"""The version's LoggedModel id."""
T_CANDIDATES = TAG_PREFIX + "candidates"
"""On a fold that tried several candidates only: compact JSON, one object per candidate
(``label``, ``method``, ``params``, ``state_uri``, ``validation``); the states kept are the
ones the next fold continues (one per method), the others are ``""``."""
T_POOL = TAG_PREFIX + "pool"
"""On a pool merge only (a lineage whose method is a pool method): compact JSON, one object per
checkpoint of the pool in order (``id``, ``uri``, ``digest``; URIs left out if it would not fit
a tag, the state lists them too). The version's ``checkpoint.*`` tags name the newest of them."""

T_REPLACES_VERSION = TAG_PREFIX + "replaces.version"
"""On a replayed fold: the version it replaces (absent on an ordinary fold)."""
T_SUPERSEDED_BY = TAG_PREFIX + "superseded.by"
"""On a superseded version: the version that replaces it ("" while its replay is pending)."""
T_SUPERSEDED_REASON = TAG_PREFIX + "superseded.reason"
"""Why it was replayed (which checkpoint was dropped, and the drop's reason)."""
T_DROPPED_REASON = TAG_PREFIX + "dropped.reason"
"""On a dropped version: the reason given to ``mergeflow lineage drop``."""
T_DROPPED_AT = TAG_PREFIX + "dropped.at"
"""On a dropped version: when it was dropped (ISO 8601, UTC)."""

# ------------------------------------------------------------------- statuses
DROPPED = "dropped"
"""Status of a version whose checkpoint was dropped: never folded again, never a parent."""
SUPERSEDED = "superseded"
"""Status of a version replaced by a replayed fold (``mergeflow.superseded.by``)."""
LIVE_STATUSES = ("accepted", "rejected")
"""Statuses of the versions that make the lineage's current history (aliases, parents)."""

VERSION_TAGS = (
    T_LINEAGE,
    T_STEP,
    T_STATUS,
    T_REASON,
    T_METHOD,
    T_METRICS,
    T_CHECKPOINT_ID,
    T_CHECKPOINT_URI,
    T_CHECKPOINT_DIGEST,
    T_PARENT_VERSION,
    T_STATE_URI,
    T_MODEL_URI,
    T_MODEL_ID,
)
"""Every tag a mergeflow version carries."""

MLFLOW_EXTERNAL = "mlflow.model.isExternal"
"""MLflow's tag for a LoggedModel whose weights live outside MLflow."""
MLFLOW_NOTE = "mlflow.note.content"
"""MLflow's tag for a run's markdown note."""

# -------------------------------------------------------------------- metric keys
TEST_PREFIX = "test/"
"""Per-task test scores are ``test/<task>``."""
TEST_AVG = "test/avg"
"""Mean test score over the tasks folded so far (the continual-learning ACC)."""
TEST_BWT = "test/bwt"
"""Backward transfer (absent at step 1, where it is undefined)."""
