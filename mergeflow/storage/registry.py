"""The MLflow registry adapter: one MLflow model version per fold, with its lineage.

Every MLflow import of mergeflow lives in this module.

What one fold records (:meth:`Registry.register_fold`), in this order:

1. a run in experiment ``mergeflow/<lineage>``: params ``method``, ``param.<k>`` (nested
   method params flattened with dots), ``base``, ``checkpoint``; metrics (per task,
   average, BWT, fold seconds, peak RSS, ...); ``log_inputs`` of the evaluation datasets;
   the markdown description as the run note;
2. an *external* MLflow 3 LoggedModel (``mlflow.model.isExternal=true``: its weights live
   outside MLflow, at ``rec.model_uri`` on S3, written by the fold task and never
   re-uploaded). It carries the same params and tags, the metrics are linked to it
   (``Metric.model_id``), and the run lists it as an output;
3. small artifacts, logged to both the run and the LoggedModel, which the tracking server
   (``--artifacts-destination s3://...``) stores on the object store:
   ``plots/accuracy_per_step.png``, ``plots/lineage.png``,
   ``plots/accuracy_heatmap.png`` (when an accuracy matrix is given), ``mergeflow.json``
   (the fold record) and ``description.md``;
4. **the commit point**: one ``create_model_version`` call that carries the version's tags,
   description, run id and LoggedModel id, with ``source=models:/<model_id>``: that is what
   the MLflow UI parses to show the version's "Source Model" (an ``s3://`` source would
   lose the link), and it makes the version's storage location the LoggedModel's artifact
   folder on the object store. The weights URI is the ``mergeflow.model_uri`` tag (also on
   the LoggedModel and in its ``MLmodel`` metadata); :func:`resolve_model_uri` reads it.
5. aliases, reconciled from the versions: :data:`NEWEST_ALIAS` on the newest version,
   :data:`CHAMPION_ALIAS` on the newest accepted one.

Crash semantics: nothing before step 4 creates a version, so a crash leaves no version and
the fold is retried. The retry soft-deletes runs (and their LoggedModels) that an earlier
attempt left for the same checkpoint digest without a version; ``mlflow gc`` purges them.
A crash between steps 4 and 5 is repaired by the retry, which finds the version
(idempotency) and reconciles the aliases.

Version tags (all strings): ``mergeflow.lineage``, ``mergeflow.step``,
``mergeflow.checkpoint.id``, ``mergeflow.checkpoint.uri``, ``mergeflow.checkpoint.digest``,
``mergeflow.parent_version`` ("" for none), ``mergeflow.state_uri``,
``mergeflow.model_uri`` ("" when rejected at validation), ``mergeflow.status``
(accepted|rejected), ``mergeflow.reason``, ``mergeflow.method``, ``mergeflow.metrics``
(compact JSON of the metrics, so :meth:`Registry.versions` needs one search call),
``mergeflow.model_id`` (the LoggedModel).

MLflow reserves the alias name ``latest`` (``models:/NAME/latest`` already means the
highest version number), so the "latest" alias of the design is named ``newest``. Because
every fold, accepted or rejected, becomes a version, ``models:/NAME/latest``,
``models:/NAME@newest`` and ``mlflow://models/NAME@latest`` all name the same version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from mergeflow.errors import CheckpointError, ConfigError, MergeflowError
from mergeflow.storage import lineage_plots as plots
from mergeflow.storage.sources import PublishedCheckpoint

__all__ = [
    "CHAMPION_ALIAS",
    "NEWEST_ALIAS",
    "FoldRecord",
    "MlflowSource",
    "Registry",
    "RegistryError",
    "VersionRecord",
    "format_chain",
    "parse_mlflow_uri",
    "resolve_model_uri",
]

CHAMPION_ALIAS = "champion"
"""On the newest accepted version; never on a rejected one."""
NEWEST_ALIAS = "newest"
"""On the newest version (accepted or rejected). MLflow reserves ``latest`` for itself."""

TAG = "mergeflow."
T_LINEAGE = TAG + "lineage"
T_STEP = TAG + "step"
T_CKPT_ID = TAG + "checkpoint.id"
T_CKPT_URI = TAG + "checkpoint.uri"
T_CKPT_DIGEST = TAG + "checkpoint.digest"
T_PARENT = TAG + "parent_version"
T_STATE = TAG + "state_uri"
T_MODEL_URI = TAG + "model_uri"
T_STATUS = TAG + "status"
T_REASON = TAG + "reason"
T_METHOD = TAG + "method"
T_METRICS = TAG + "metrics"
T_MODEL_ID = TAG + "model_id"

_MAX_PARAM_VALUE = 6000
_MAX_REASON = 4000
_MAX_DESCRIPTION = 4900
_EXTERNAL_TAG = "mlflow.model.isExternal"


class RegistryError(MergeflowError):
    """The tracking server refused a request or holds something mergeflow cannot use."""


class FoldRecord(BaseModel):
    """Everything one fold registers (see the module doc for where each field goes)."""

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
    """Per-task test scores ``acc/<task>``, ``acc_avg``, ``bwt``, ``fold_seconds``, ``peak_rss_mb``..."""
    accuracy_matrix: list[list[float | None]] = Field(default_factory=list)
    """a_i(θ̄_j) for the heatmap: rows tasks i, columns steps j."""
    task_names: list[str] = Field(default_factory=list)
    eval_datasets: list[dict[str, Any]] = Field(default_factory=list)
    """For ``log_inputs``: ``{name, uri, split, digest}`` each (digest optional)."""


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


# ---------------------------------------------------------------------------- helpers
def _mlflow_errors(what: str) -> Any:
    """Context manager turning MlflowException into RegistryError with ``what`` in front."""

    @contextmanager
    def wrap() -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as err:
            raise RegistryError(f"{what}: {err.message}") from err

    return wrap()


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from mergeflow.settings import Settings

    return Settings().mlflow_url  # the embedded stack (`mergeflow up`)


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    uri = tracking_uri or _default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


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


def _run_params(rec: FoldRecord) -> dict[str, str]:
    return {
        "method": rec.method,
        **_flatten(rec.params, "param"),
        "base": rec.base_uri[:_MAX_PARAM_VALUE],
        "checkpoint": rec.checkpoint_uri[:_MAX_PARAM_VALUE],
    }


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _version_tags(rec: FoldRecord, model_id: str) -> dict[str, str]:
    return {
        T_LINEAGE: rec.lineage,
        T_STEP: str(rec.step),
        T_CKPT_ID: rec.checkpoint_id,
        T_CKPT_URI: rec.checkpoint_uri,
        T_CKPT_DIGEST: rec.checkpoint_digest,
        T_PARENT: rec.parent_version or "",
        T_STATE: rec.state_uri,
        T_MODEL_URI: rec.model_uri,
        T_STATUS: rec.status,
        T_REASON: rec.reason[:_MAX_REASON],
        T_METHOD: rec.method,
        T_METRICS: json.dumps(_finite_metrics(rec.metrics), sort_keys=True, separators=(",", ":")),
        T_MODEL_ID: model_id,
    }


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _metrics_order(metrics: Mapping[str, float]) -> list[str]:
    head = [k for k in ("acc_avg", "bwt") if k in metrics]
    tasks = sorted(k for k in metrics if k.startswith("acc/"))
    rest = sorted(k for k in metrics if k not in head and k not in tasks)
    return head + tasks + rest


def describe(rec: FoldRecord) -> str:
    """The markdown description of a version (also the run note and ``description.md``)."""
    parent = f"version {rec.parent_version}" if rec.parent_version else "none (first fold)"
    params = ", ".join(f"{k}={v}" for k, v in sorted(rec.params.items())) or "defaults"
    lines = [
        f"**{rec.status.upper()}** · lineage `{rec.lineage}` · step {rec.step}",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{rec.checkpoint_id}` |",
        f"| checkpoint URI | `{rec.checkpoint_uri}` |",
        f"| digest | `{rec.checkpoint_digest}` |",
        f"| parent | {parent} |",
        f"| method | `{rec.method}` ({params}) |",
        f"| base | `{rec.base_uri}` |",
        f"| weights | `{rec.model_uri or '-'}` |",
        f"| state | `{rec.state_uri or '-'}` |",
    ]
    if rec.reason:
        lines.append(f"| reason | {rec.reason.replace('|', '/').replace(chr(10), ' ')[:600]} |")
    metrics = _finite_metrics(rec.metrics)
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        keys = _metrics_order(metrics)
        lines += [f"| {k} | {_fmt(metrics[k])} |" for k in keys[:40]]
        if len(keys) > 40:
            lines.append(f"| … | {len(keys) - 40} more in the run |")
    text = "\n".join(lines)
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 1] + "…"


def _dataset_inputs(rec: FoldRecord) -> tuple[list[Any], dict[str, tuple[str, str]]]:
    """DatasetInputs for ``log_inputs`` and task name -> (dataset name, digest) for metrics."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs, by_name = [], {}
    for d in rec.eval_datasets:
        name = str(d.get("name") or d.get("uri") or "dataset")[:500]
        uri = str(d.get("uri", ""))
        split = str(d.get("split", "test"))
        digest = str(d.get("digest") or "")
        digest = digest.split(":", 1)[-1] if digest else hashlib.sha256(uri.encode()).hexdigest()
        digest = digest[:32]  # MLflow keeps 36 characters
        source_type = urlparse(uri).scheme or "local"
        dataset = Dataset(
            name=name,
            digest=digest,
            source_type=source_type if len(source_type) > 1 else "local",
            source=json.dumps({"uri": uri}),
            profile=json.dumps({"split": split}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
        if split == "test":
            by_name[name] = (name, digest)
    return inputs, by_name


def _created_at(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def _aliases_of(version: str, aliases: Mapping[str, str]) -> list[str]:
    return sorted(a for a, v in aliases.items() if str(v) == str(version))


def _to_record(mv: Any, aliases: Mapping[str, str]) -> VersionRecord:
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
        checkpoint_id=tags.get(T_CKPT_ID, ""),
        checkpoint_digest=tags.get(T_CKPT_DIGEST, ""),
        parent_version=tags.get(T_PARENT) or None,
        state_uri=tags.get(T_STATE, ""),
        model_uri=tags.get(T_MODEL_URI, ""),
        metrics=metrics,
        run_id=mv.run_id or None,
        aliases=_aliases_of(str(mv.version), aliases),
        checkpoint_uri=tags.get(T_CKPT_URI, ""),
        reason=tags.get(T_REASON, ""),
        method=tags.get(T_METHOD, ""),
        lineage=tags.get(T_LINEAGE, ""),
        model_id=getattr(mv, "model_id", None) or tags.get(T_MODEL_ID) or None,
        created_at=_created_at(mv.creation_timestamp),
    )


def _node(v: VersionRecord) -> plots.PlotNode:
    return plots.PlotNode(
        version=v.version,
        step=v.step,
        status=v.status,
        checkpoint_id=v.checkpoint_id,
        parent_version=v.parent_version,
        acc_avg=v.metrics.get("acc_avg"),
        aliases=tuple(v.aliases),
    )


def _search_versions(client: Any, name: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(
            filter_string=f"name = '{_quote(name)}'", max_results=1000, page_token=token
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def _aliases(client: Any, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).aliases or {})
    except MlflowException as err:
        if _not_found(err):
            return {}
        raise


# --------------------------------------------------------------------------- registry
class Registry:
    """Reads and writes a lineage's versions on an MLflow tracking server.

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else the embedded stack's MLflow
    URL from :class:`mergeflow.settings.Settings`. The registry URI is the same server.
    Query methods treat a registered model that does not exist yet as empty (a lineage
    before its first fold). Server errors raise :class:`RegistryError`.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri or _default_tracking_uri()
        self.client = _client(self.tracking_uri)

    # ------------------------------------------------------------------ queries
    def versions(self, registered_model: str) -> list[VersionRecord]:
        """All versions of ``registered_model``, ordered by step then version number."""
        with _mlflow_errors(f"listing versions of {registered_model!r}"):
            mvs = _search_versions(self.client, registered_model)
            aliases = _aliases(self.client, registered_model) if mvs else {}
        records = [_to_record(mv, aliases) for mv in mvs if mv.name == registered_model]
        return sorted(records, key=lambda r: (r.step, int(r.version)))

    def find(self, registered_model: str, checkpoint_digest: str) -> VersionRecord | None:
        """The version that recorded the checkpoint with this digest, if any."""
        for v in self.versions(registered_model):
            if v.checkpoint_digest == checkpoint_digest:
                return v
        return None

    def champion(self, registered_model: str) -> VersionRecord | None:
        """The version holding the ``champion`` alias, or None."""
        return self._by_alias(registered_model, CHAMPION_ALIAS)

    def newest(self, registered_model: str) -> VersionRecord | None:
        """The version holding the ``newest`` alias (the design's ``latest``), or None."""
        return self._by_alias(registered_model, NEWEST_ALIAS)

    def last_accepted(self, registered_model: str) -> VersionRecord | None:
        """The accepted version with the highest step (what the next fold builds on)."""
        accepted = [v for v in self.versions(registered_model) if v.status == "accepted"]
        return accepted[-1] if accepted else None

    def seen_checkpoints(self, registered_model: str) -> set[str]:
        """Ids AND digests of every checkpoint folded or rejected (never fold them again)."""
        seen: set[str] = set()
        for v in self.versions(registered_model):
            seen.update(x for x in (v.checkpoint_id, v.checkpoint_digest) if x)
        return seen

    def _by_alias(self, registered_model: str, alias: str) -> VersionRecord | None:
        from mlflow.exceptions import MlflowException

        with _mlflow_errors(f"reading alias {alias!r} of {registered_model!r}"):
            try:
                mv = self.client.get_model_version_by_alias(registered_model, alias)
            except MlflowException as err:
                if _not_found(err) or getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE":
                    return None
                raise
            aliases = _aliases(self.client, registered_model)
        return _to_record(mv, aliases)

    # ------------------------------------------------------------------- writes
    def register_fold(self, rec: FoldRecord) -> VersionRecord:
        """Record one fold as a new version of ``rec.registered_model`` (see the module doc).

        Idempotent: when a version with ``rec.checkpoint_digest`` exists already it is
        returned (after repairing the aliases) and nothing else is written. The version is
        created last, as the commit point.
        """
        if rec.status == "accepted" and not rec.model_uri:
            raise ConfigError(f"fold {rec.checkpoint_id!r}: an accepted fold needs model_uri")
        existing = self.versions(rec.registered_model)
        others = {v.lineage for v in existing if v.lineage and v.lineage != rec.lineage}
        if others:
            raise ConfigError(
                f"registered model {rec.registered_model!r} already records lineage "
                f"{sorted(others)[0]!r}, not {rec.lineage!r}; give each lineage its own model"
            )
        for v in existing:
            if v.checkpoint_digest == rec.checkpoint_digest:
                with _mlflow_errors(f"repairing aliases of {rec.registered_model!r}"):
                    aliases = self._reconcile_aliases(rec.registered_model, existing)
                return v.model_copy(update={"aliases": _aliases_of(v.version, aliases)})

        with _mlflow_errors(f"registering fold {rec.checkpoint_id!r} of {rec.lineage!r}"):
            experiment_id = self._experiment(rec.lineage)
            self._drop_orphans(experiment_id, rec.checkpoint_digest)
            predicted = str(max((int(v.version) for v in existing), default=0) + 1)
            run_id, model_id = self._log_run(rec, experiment_id, existing, predicted)
            mv = self._create_version(rec, run_id, model_id)  # the commit point
            new = _to_record(mv, {})
            if new.version != predicted:  # versions were deleted: relabel the pictures
                self._log_artifacts(rec, existing, run_id, model_id, new.version, mlmodel=None)
            all_versions = sorted([*existing, new], key=lambda r: (r.step, int(r.version)))
            aliases = self._reconcile_aliases(rec.registered_model, all_versions)
        return new.model_copy(update={"aliases": _aliases_of(new.version, aliases)})

    def record_rejection(self, rec: FoldRecord) -> VersionRecord:
        """Record a checkpoint that failed validation: a rejected version without weights.

        Same as :meth:`register_fold` with ``status="rejected"`` and ``model_uri=""``, so
        the checkpoint shows in the lineage and is never retried.
        """
        return self.register_fold(rec.model_copy(update={"status": "rejected", "model_uri": ""}))

    # ---------------------------------------------------------------- internals
    def _experiment(self, lineage: str) -> str:
        from mlflow.exceptions import MlflowException

        name = f"mergeflow/{lineage}"
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, tags={T_LINEAGE: lineage})
        except MlflowException:  # created concurrently
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _drop_orphans(self, experiment_id: str, digest: str) -> None:
        """Soft-delete runs (and LoggedModels) of earlier attempts that never got a version."""
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{T_CKPT_DIGEST}` = '{_quote(digest)}'"
        )
        for run in runs:
            model_id = run.data.tags.get(T_MODEL_ID)
            if model_id:
                try:
                    self.client.delete_logged_model(model_id)
                except Exception:  # noqa: BLE001 - best effort clean-up
                    pass
            self.client.delete_run(run.info.run_id)

    def _log_run(
        self, rec: FoldRecord, experiment_id: str, existing: list[VersionRecord], predicted: str
    ) -> tuple[str, str]:
        from mlflow.entities import LoggedModelOutput, Metric, Param, RunStatus, RunTag

        client = self.client
        description = describe(rec)
        run_tags = {
            T_LINEAGE: rec.lineage,
            T_STEP: str(rec.step),
            T_CKPT_ID: rec.checkpoint_id,
            T_CKPT_DIGEST: rec.checkpoint_digest,
            T_STATUS: rec.status,
            "mlflow.note.content": description,
        }
        name = f"step-{rec.step:04d}-{rec.checkpoint_id}"[:250]
        run = client.create_run(experiment_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        try:
            params = _run_params(rec)
            model = client.create_logged_model(
                experiment_id=experiment_id,
                name=f"{rec.lineage}-step{rec.step:04d}"[:250],
                source_run_id=run_id,
                tags={**_version_tags(rec, ""), _EXTERNAL_TAG: "true"},
                params=params,
                model_type="mergeflow-merged",
            )
            model_id = model.model_id
            client.set_tag(run_id, T_MODEL_ID, model_id)
            client.set_logged_model_tags(model_id, {T_MODEL_ID: model_id})
            inputs, by_dataset = _dataset_inputs(rec)
            if inputs:
                client.log_inputs(run_id, datasets=inputs)
            now = int(time.time() * 1000)
            metrics = []
            for key, value in _finite_metrics(rec.metrics).items():
                ds = by_dataset.get(key.split("/", 1)[1]) if key.startswith("acc/") else None
                metrics.append(
                    Metric(
                        key,
                        value,
                        now,
                        rec.step,
                        model_id=model_id,
                        dataset_name=ds[0] if ds else None,
                        dataset_digest=ds[1] if ds else None,
                    )
                )
            items = list(params.items())
            for i in range(0, max(len(items), len(metrics), 1), 100):
                client.log_batch(
                    run_id,
                    metrics=metrics[i : i + 100],
                    params=[Param(k, v) for k, v in items[i : i + 100]],
                    tags=[RunTag(T_STATE, rec.state_uri), RunTag(T_MODEL_URI, rec.model_uri)]
                    if i == 0
                    else [],
                )
            client.log_outputs(run_id, [LoggedModelOutput(model_id, rec.step)])
            self._log_artifacts(rec, existing, run_id, model_id, predicted, mlmodel=model)
            client.finalize_logged_model(model_id, "READY")
        except BaseException:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id, model_id

    def _log_artifacts(
        self,
        rec: FoldRecord,
        existing: list[VersionRecord],
        run_id: str,
        model_id: str,
        version: str,
        mlmodel: Any | None,
    ) -> None:
        """Draw the pictures, write the JSON/markdown, log them to the run and the LoggedModel."""
        with tempfile.TemporaryDirectory(prefix="mergeflow-registry-") as tmp:
            folder = Path(tmp)
            _write_artifacts(folder, rec, existing, version)
            self.client.log_artifacts(run_id, str(folder))
            if mlmodel is not None:
                _write_mlmodel(folder, mlmodel)
            self.client.log_model_artifacts(model_id, str(folder))

    def _create_version(self, rec: FoldRecord, run_id: str, model_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                rec.registered_model,
                tags={T_LINEAGE: rec.lineage},
                description=f"mergeflow lineage `{rec.lineage}`: one version per folded checkpoint.",
            )
        except MlflowException as err:
            if getattr(err, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        mv = self.client.create_model_version(
            name=rec.registered_model,
            source=f"models:/{model_id}",  # the UI links "Source Model" from this
            run_id=run_id,
            tags=_version_tags(rec, model_id),
            description=describe(rec),
            await_creation_for=0,
            model_id=model_id,
        )
        return mv

    def _reconcile_aliases(
        self, registered_model: str, versions: list[VersionRecord]
    ) -> dict[str, str]:
        """``newest`` on the last version, ``champion`` on the last accepted (idempotent).

        ``versions`` is the full, ordered list; their ``aliases`` are what the server holds.
        Returns the alias map after the change.
        """
        current = {a: v.version for v in versions for a in v.aliases}
        if not versions:
            return current
        want = {NEWEST_ALIAS: versions[-1].version}
        accepted = [v for v in versions if v.status == "accepted"]
        if accepted:
            want[CHAMPION_ALIAS] = accepted[-1].version
        for alias, version in want.items():
            if current.get(alias) != version:
                self.client.set_registered_model_alias(registered_model, alias, version)
                current[alias] = version
        if not accepted and CHAMPION_ALIAS in current:
            self.client.delete_registered_model_alias(registered_model, CHAMPION_ALIAS)
            del current[CHAMPION_ALIAS]
        return current


def _write_artifacts(
    folder: Path, rec: FoldRecord, existing: list[VersionRecord], version: str
) -> None:
    """plots/*.png, description.md and mergeflow.json for the fold that becomes ``version``."""
    nodes = [_node(v) for v in existing]
    new = plots.PlotNode(
        version=version,
        step=rec.step,
        status=rec.status,
        checkpoint_id=rec.checkpoint_id,
        parent_version=rec.parent_version,
        acc_avg=_finite_metrics(rec.metrics).get("acc_avg"),
        aliases=(NEWEST_ALIAS, CHAMPION_ALIAS) if rec.status == "accepted" else (NEWEST_ALIAS,),
    )
    moved = {NEWEST_ALIAS, CHAMPION_ALIAS} if rec.status == "accepted" else {NEWEST_ALIAS}
    nodes = [replace(n, aliases=tuple(a for a in n.aliases if a not in moved)) for n in nodes]
    nodes.append(new)
    title = f"{rec.lineage}: "
    plots.plot_accuracy_per_step(
        nodes,
        folder / "plots" / "accuracy_per_step.png",
        accuracy_matrix=rec.accuracy_matrix,
        task_names=rec.task_names,
        title=title + "accuracy per step",
    )
    plots.plot_lineage(nodes, folder / "plots" / "lineage.png", title=title + "lineage")
    if rec.accuracy_matrix:
        plots.plot_accuracy_heatmap(
            rec.accuracy_matrix,
            rec.task_names,
            folder / "plots" / "accuracy_heatmap.png",
            title=title + "accuracy a_i(θ̄_j)",
        )
    (folder / "description.md").write_text(describe(rec) + "\n", encoding="utf-8")
    (folder / "mergeflow.json").write_text(
        json.dumps({"version": version, **rec.model_dump(mode="json")}, indent=2, default=str),
        encoding="utf-8",
    )


def _write_mlmodel(folder: Path, model: Any) -> None:
    """The MLmodel file MLflow writes for external models (what ``create_external_model`` does)."""
    from mlflow.models.model import MLMODEL_FILE_NAME, Model

    Model(
        artifact_path=model.artifact_location,
        model_uuid=model.model_id,
        model_id=model.model_id,
        run_id=model.source_run_id,
        metadata={_EXTERNAL_TAG: True, T_MODEL_URI: model.tags.get(T_MODEL_URI, "")},
    ).save(str(folder / MLMODEL_FILE_NAME))


# ------------------------------------------------------------------- URIs and sources
def parse_mlflow_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``mlflow://models/NAME[/VERSION|@ALIAS]`` into (name, version, alias).

    ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` (MLflow's own form) work too.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "mlflow" and parsed.netloc == "models":
        rest = parsed.path.lstrip("/")
    elif parsed.scheme == "models" and not parsed.netloc:
        rest = parsed.path.lstrip("/")
    else:
        raise CheckpointError(
            uri,
            "not an MLflow model URI (use mlflow://models/NAME/VERSION or mlflow://models/NAME@ALIAS)",
        )
    rest = rest.rstrip("/")
    if not rest:
        raise CheckpointError(uri, "no registered model name")
    if "@" in rest.rsplit("/", 1)[-1]:
        name, _, alias = rest.rpartition("@")
        if not name or not alias:
            raise CheckpointError(uri, "expected NAME@ALIAS")
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if name and (version.isdigit() or version == "latest"):
        return name, version, None
    return rest, None, None


def _artifacts_to_storage(uri: str) -> str:
    """Map a proxied ``mlflow-artifacts:`` URI onto the server's artifacts destination."""
    parsed = urlparse(uri)
    if parsed.scheme != "mlflow-artifacts":
        return uri
    from mergeflow.settings import Settings

    dest = Settings().artifacts_destination  # MERGEFLOW_MLFLOW_ARTIFACTS_DESTINATION
    return f"{dest.rstrip('/')}/{parsed.path.lstrip('/')}"


def _get_version(client: Any, uri: str, name: str, version: str | None, alias: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if _not_found(err):
            raise CheckpointError(uri, f"registered model {name!r} does not exist") from err
        raise RegistryError(f"{uri}: {err.message}") from err
    try:
        if version == "latest" or alias == "latest":
            mvs = _search_versions(client, name)
            if not mvs:
                raise CheckpointError(uri, f"registered model {name!r} has no versions")
            return max(mvs, key=lambda m: int(m.version))
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version is None:
            raise CheckpointError(
                uri, "name a version or an alias: mlflow://models/NAME/VERSION or NAME@ALIAS"
            )
        return client.get_model_version(name, version)
    except MlflowException as err:
        if _not_found(err) or getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE":
            what = f"alias {alias!r}" if alias is not None else f"version {version}"
            raise CheckpointError(uri, f"registered model {name!r} has no {what}") from err
        raise RegistryError(f"{uri}: {err.message}") from err


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """Turn ``mlflow://models/NAME/VERSION`` or ``mlflow://models/NAME@ALIAS`` into a weights URI.

    mergeflow versions answer their ``mergeflow.model_uri`` tag (the merged weights on S3).
    Other versions (an upstream team's) answer their download URI (the version's source or
    its LoggedModel's artifacts), with ``mlflow-artifacts:`` mapped onto the artifacts
    destination (``MERGEFLOW_MLFLOW_ARTIFACTS_DESTINATION``, default
    ``s3://<MERGEFLOW_BUCKET>/mlartifacts``, as the embedded stack runs it). ``@latest`` and ``/latest`` mean the highest version.
    Raises :class:`CheckpointError` for an unknown model, version or alias and for a
    rejected version that has no weights.
    """
    name, version, alias = parse_mlflow_uri(uri)
    client = _client(tracking_uri)
    mv = _get_version(client, uri, name, version, alias)
    tags = dict(mv.tags or {})
    if T_MODEL_URI in tags:
        if not tags[T_MODEL_URI]:
            reason = tags.get(T_REASON) or "no reason recorded"
            raise CheckpointError(uri, f"version {mv.version} has no weights (rejected: {reason})")
        return tags[T_MODEL_URI]
    with _mlflow_errors(f"resolving {uri}"):
        download = client.get_model_version_download_uri(name, str(mv.version))
    return _artifacts_to_storage(download)


class MlflowSource:
    """Watches an MLflow registered model: each READY version is one published checkpoint.

    Publication order is the version number. The id is ``<NAME>-v<VERSION>``, the URI
    ``mlflow://models/NAME/VERSION`` (opened through :func:`resolve_model_uri`), and the
    digest ``sha256:`` over the version's immutable identity (name, version, source, run
    and LoggedModel ids, weights URI tag). Versions a mergeflow lineage rejected
    (``mergeflow.status=rejected``) are not offered. An unknown model raises
    :class:`CheckpointError` (a typo should not look like "nothing published yet").
    """

    def __init__(self, registered_model: str, tracking_uri: str | None = None) -> None:
        if not registered_model:
            raise ConfigError("MlflowSource needs a registered model name")
        self.registered_model = registered_model
        self.tracking_uri = tracking_uri
        self.uri = f"mlflow://models/{registered_model}"

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None) -> MlflowSource:
        """``mlflow://models/NAME`` -> a source watching NAME."""
        name, version, alias = parse_mlflow_uri(uri)
        if version is not None or alias is not None:
            raise ConfigError(
                f"source {uri!r}: watch a registered model (mlflow://models/NAME), not one version"
            )
        return cls(name, tracking_uri)

    def __repr__(self) -> str:
        return f"MlflowSource({self.registered_model!r})"

    def list(self) -> list[PublishedCheckpoint]:
        """READY versions, oldest first."""
        from mlflow.exceptions import MlflowException

        client = _client(self.tracking_uri)
        try:
            client.get_registered_model(self.registered_model)
            mvs = _search_versions(client, self.registered_model)
        except MlflowException as err:
            if _not_found(err):
                raise CheckpointError(
                    self.uri, f"registered model {self.registered_model!r} does not exist"
                ) from err
            raise RegistryError(f"{self.uri}: {err.message}") from err
        out = []
        for mv in sorted(mvs, key=lambda m: int(m.version)):
            tags = dict(mv.tags or {})
            if str(mv.status) != "READY" or tags.get(T_STATUS) == "rejected":
                continue
            identity = "\n".join(
                [
                    self.registered_model,
                    str(mv.version),
                    mv.source or "",
                    mv.run_id or "",
                    getattr(mv, "model_id", None) or "",
                    tags.get(T_MODEL_URI, ""),
                ]
            )
            out.append(
                PublishedCheckpoint(
                    id=f"{self.registered_model}-v{mv.version}",
                    uri=f"mlflow://models/{self.registered_model}/{mv.version}",
                    digest="sha256:" + hashlib.sha256(identity.encode()).hexdigest(),
                    published_at=_created_at(mv.creation_timestamp) or datetime.now(timezone.utc),
                )
            )
        return out


def format_chain(versions: list[VersionRecord]) -> str:
    """A text table of the version chain for ``mergeflow lineage show``."""
    if not versions:
        return "(no versions)"
    header = [
        "version",
        "step",
        "status",
        "checkpoint",
        "parent",
        "acc_avg",
        "bwt",
        "aliases",
        "reason",
    ]
    rows = []
    for v in versions:
        acc, bwt = v.metrics.get("acc_avg"), v.metrics.get("bwt")
        rows.append(
            [
                v.version,
                str(v.step),
                v.status,
                v.checkpoint_id if len(v.checkpoint_id) <= 32 else v.checkpoint_id[:31] + "…",
                v.parent_version or "-",
                f"{acc:.4f}" if acc is not None else "-",
                f"{bwt:+.4f}" if bwt is not None else "-",
                ",".join(v.aliases) or "-",
                (v.reason[:60] + ("…" if len(v.reason) > 60 else "")) if v.reason else "",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)
