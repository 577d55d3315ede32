"""``Registry``: writes one fold as a run, a LoggedModel and a model version; reads them back."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, Param, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mergeflow.errors import ConfigError
from mergeflow.storage.registry.connection import (
    aliases,
    default_tracking_uri,
    make_client,
    mlflow_errors,
    not_found,
    quote,
    search_versions,
)
from mergeflow.storage.registry.entities import dataset_inputs, linked_metrics, write_mlmodel
from mergeflow.storage.registry.records import (
    FoldRecord,
    VersionRecord,
    aliases_of,
    run_params,
    version_from_mlflow,
    version_tags,
)
from mergeflow.storage.registry.render import describe, write_artifacts
from mergeflow.storage.registry.tags import (
    CHAMPION_ALIAS,
    LIVE_STATUSES,
    MLFLOW_EXTERNAL,
    MLFLOW_NOTE,
    NEWEST_ALIAS,
    T_CHECKPOINT_DIGEST,
    T_CHECKPOINT_ID,
    T_LINEAGE,
    T_MODEL_ID,
    T_MODEL_URI,
    T_STATE_URI,
    T_STATUS,
    T_STEP,
)

__all__ = ["Registry"]


class Registry:
    """Reads and writes a lineage's versions on an MLflow tracking server.

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else the embedded stack's MLflow
    URL from :class:`mergeflow.settings.Settings`. The registry URI is the same server.
    Query methods treat a registered model that does not exist yet as empty (a lineage
    before its first fold). Server errors raise
    :class:`~mergeflow.storage.registry.records.RegistryError`.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri: str = tracking_uri or default_tracking_uri()
        self.client: MlflowClient = make_client(self.tracking_uri)

    # ------------------------------------------------------------------ queries
    def versions(self, registered_model: str) -> list[VersionRecord]:
        """All versions of ``registered_model``, ordered by step then version number."""
        with mlflow_errors(f"listing versions of {registered_model!r}"):
            mvs = search_versions(self.client, registered_model)
            held = aliases(self.client, registered_model) if mvs else {}
        records = [version_from_mlflow(mv, held) for mv in mvs if mv.name == registered_model]
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
        """Ids AND digests of every checkpoint folded, merged in a pool or rejected (never fold them again)."""
        seen: set[str] = set()
        for v in self.versions(registered_model):
            seen |= v.held()
        return seen

    def _by_alias(self, registered_model: str, alias: str) -> VersionRecord | None:
        with mlflow_errors(f"reading alias {alias!r} of {registered_model!r}"):
            try:
                mv = self.client.get_model_version_by_alias(registered_model, alias)
            except MlflowException as err:
                if not_found(err) or getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE":
                    return None
                raise
            held = aliases(self.client, registered_model)
        return version_from_mlflow(mv, held)

    # ------------------------------------------------------------------- writes
    def register_fold(self, rec: FoldRecord) -> VersionRecord:
        """Record one fold as a new version of ``rec.registered_model`` (see the package doc).

        Idempotent: when a version with ``rec.checkpoint_digest`` (and the same
        ``rec.replaces``: a replayed fold is a new version of the same checkpoint) exists
        already it is returned (after repairing the aliases) and nothing else is written.
        The version is created last, as the commit point.
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
            if v.checkpoint_digest == rec.checkpoint_digest and v.replaces == rec.replaces:
                with mlflow_errors(f"repairing aliases of {rec.registered_model!r}"):
                    held = self._reconcile_aliases(rec.registered_model, existing)
                return v.model_copy(update={"aliases": aliases_of(v.version, held)})

        with mlflow_errors(f"registering fold {rec.checkpoint_id!r} of {rec.lineage!r}"):
            experiment_id = self._experiment(rec.lineage)
            self._drop_orphans(
                experiment_id, rec.checkpoint_digest, {v.run_id for v in existing if v.run_id}
            )
            predicted = str(max((int(v.version) for v in existing), default=0) + 1)
            run_id, model_id = self._log_run(rec, experiment_id, existing, predicted)
            mv = self._create_version(rec, run_id, model_id)  # the commit point
            new = version_from_mlflow(mv, {})
            if new.version != predicted:  # versions were deleted: relabel the pictures
                self._log_artifacts(rec, existing, run_id, model_id, new.version, mlmodel=None)
            all_versions = sorted([*existing, new], key=lambda r: (r.step, int(r.version)))
            held = self._reconcile_aliases(rec.registered_model, all_versions)
        return new.model_copy(update={"aliases": aliases_of(new.version, held)})

    def record_rejection(self, rec: FoldRecord) -> VersionRecord:
        """Record a checkpoint that failed validation: a rejected version without weights.

        Same as :meth:`register_fold` with ``status="rejected"`` and ``model_uri=""``, so
        the checkpoint shows in the lineage and is never retried.
        """
        return self.register_fold(rec.model_copy(update={"status": "rejected", "model_uri": ""}))

    def reconcile_aliases(self, registered_model: str) -> dict[str, str]:
        """Put ``newest`` and ``champion`` where the live versions say (after a history edit)."""
        with mlflow_errors(f"reconciling aliases of {registered_model!r}"):
            return self._reconcile_aliases(registered_model, self.versions(registered_model))

    # ---------------------------------------------------------------- internals
    def _experiment(self, lineage: str) -> str:
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

    def _drop_orphans(self, experiment_id: str, digest: str, keep: set[str]) -> None:
        """Soft-delete runs (and LoggedModels) of earlier attempts that never got a version.

        ``keep``: run ids that versions use (a replayed fold shares its digest with them)."""
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{T_CHECKPOINT_DIGEST}` = '{quote(digest)}'"
        )
        for run in runs:
            if run.info.run_id in keep:
                continue
            model_id = run.data.tags.get(T_MODEL_ID)
            if model_id:
                try:
                    self.client.delete_logged_model(model_id)
                except Exception:
                    pass
            self.client.delete_run(run.info.run_id)

    def _log_run(
        self, rec: FoldRecord, experiment_id: str, existing: list[VersionRecord], predicted: str
    ) -> tuple[str, str]:
        """Steps 1-3 of the package doc: the run, the external LoggedModel, the artifacts."""
        client = self.client
        run_tags = {
            T_LINEAGE: rec.lineage,
            T_STEP: str(rec.step),
            T_CHECKPOINT_ID: rec.checkpoint_id,
            T_CHECKPOINT_DIGEST: rec.checkpoint_digest,
            T_STATUS: rec.status,
            MLFLOW_NOTE: describe(rec),
        }
        name = f"step-{rec.step:04d}-{rec.checkpoint_id}"[:250]
        run = client.create_run(experiment_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        try:
            params = run_params(rec)
            model = client.create_logged_model(
                experiment_id=experiment_id,
                name=f"{rec.lineage}-step{rec.step:04d}"[:250],
                source_run_id=run_id,
                tags={**version_tags(rec, ""), MLFLOW_EXTERNAL: "true"},
                params=params,
                model_type="mergeflow-merged",
            )
            model_id = model.model_id
            client.set_tag(run_id, T_MODEL_ID, model_id)
            client.set_logged_model_tags(model_id, {T_MODEL_ID: model_id})
            inputs, by_task = dataset_inputs(rec)
            if inputs:
                client.log_inputs(run_id, datasets=inputs)
            metrics = linked_metrics(rec, model_id, by_task)
            items = list(params.items())
            for i in range(0, max(len(items), len(metrics), 1), 100):
                client.log_batch(
                    run_id,
                    metrics=metrics[i : i + 100],
                    params=[Param(k, v) for k, v in items[i : i + 100]],
                    tags=[RunTag(T_STATE_URI, rec.state_uri), RunTag(T_MODEL_URI, rec.model_uri)]
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
        mlmodel: LoggedModel | None,
    ) -> None:
        """Draw the pictures, write the JSON/markdown, log them to the run and the LoggedModel."""
        with tempfile.TemporaryDirectory(prefix="mergeflow-registry-") as tmp:
            folder = Path(tmp)
            write_artifacts(folder, rec, existing, version)
            self.client.log_artifacts(run_id, str(folder))
            if mlmodel is not None:
                write_mlmodel(folder, mlmodel)
            self.client.log_model_artifacts(model_id, str(folder))

    def _create_version(self, rec: FoldRecord, run_id: str, model_id: str) -> ModelVersion:
        """Step 4 of the package doc, the commit point (creates the registered model first)."""
        try:
            self.client.create_registered_model(
                rec.registered_model,
                tags={T_LINEAGE: rec.lineage},
                description=f"mergeflow lineage `{rec.lineage}`: one version per folded checkpoint.",
            )
        except MlflowException as err:
            if getattr(err, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        return self.client.create_model_version(
            name=rec.registered_model,
            source=f"models:/{model_id}",  # the UI links "Source Model" from this
            run_id=run_id,
            tags=version_tags(rec, model_id),
            description=describe(rec),
            await_creation_for=0,
            model_id=model_id,
        )

    def _reconcile_aliases(
        self, registered_model: str, versions: list[VersionRecord]
    ) -> dict[str, str]:
        """``newest`` on the last version, ``champion`` on the last accepted (idempotent).

        ``versions`` is the full, ordered list; their ``aliases`` are what the server holds.
        Returns the alias map after the change.
        """
        current = {a: v.version for v in versions for a in v.aliases}
        live = [v for v in versions if v.status in LIVE_STATUSES]  # not dropped or superseded
        if not live:
            for alias in [a for a in (NEWEST_ALIAS, CHAMPION_ALIAS) if a in current]:
                self.client.delete_registered_model_alias(registered_model, alias)
                del current[alias]
            return current
        want = {NEWEST_ALIAS: live[-1].version}
        accepted = [v for v in live if v.status == "accepted"]
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
