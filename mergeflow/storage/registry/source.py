"""``MlflowSource``: a registered model watched as a checkpoint source."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.storage.registry.connection import make_client, not_found, search_versions
from mergeflow.storage.registry.records import RegistryError, created_at
from mergeflow.storage.registry.tags import T_MODEL_URI, T_STATUS
from mergeflow.storage.registry.uri import parse_mlflow_uri
from mergeflow.storage.sources import CheckpointRef

__all__ = ["MlflowSource"]


class MlflowSource:
    """Watches an MLflow registered model: each READY version is one published checkpoint.

    Publication order is the version number. The id is ``<NAME>-v<VERSION>``, the URI
    ``mlflow://models/NAME/VERSION`` (opened through
    :func:`~mergeflow.storage.registry.uri.resolve_model_uri`), and the digest ``sha256:``
    over the version's immutable identity (name, version, source, run and LoggedModel ids,
    weights URI tag). Versions a mergeflow lineage rejected (``mergeflow.status=rejected``)
    are not offered. An unknown model raises :class:`CheckpointError` (a typo should not
    look like "nothing published yet").
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

    def list(self) -> list[CheckpointRef]:
        """READY versions, oldest first."""
        client = make_client(self.tracking_uri)
        try:
            client.get_registered_model(self.registered_model)
            mvs = search_versions(client, self.registered_model)
        except MlflowException as err:
            if not_found(err):
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
                CheckpointRef(
                    id=f"{self.registered_model}-v{mv.version}",
                    uri=f"mlflow://models/{self.registered_model}/{mv.version}",
                    digest="sha256:" + hashlib.sha256(identity.encode()).hexdigest(),
                    published_at=created_at(mv.creation_timestamp) or datetime.now(timezone.utc),
                )
            )
        return out
