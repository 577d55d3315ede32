"""``mlflow://models/...`` and ``models:/...`` URIs: parsing, and resolving to a weights URI."""

from __future__ import annotations

from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mergeflow.errors import CheckpointError
from mergeflow.settings import Settings
from mergeflow.storage.registry.connection import (
    make_client,
    mlflow_errors,
    not_found,
    search_versions,
)
from mergeflow.storage.registry.records import RegistryError
from mergeflow.storage.registry.tags import T_MODEL_URI, T_REASON

__all__ = ["parse_mlflow_uri", "resolve_model_uri"]


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

    dest = Settings().artifacts_destination  # MERGEFLOW_MLFLOW_ARTIFACTS_DESTINATION
    return f"{dest.rstrip('/')}/{parsed.path.lstrip('/')}"


def _get_version(
    client: MlflowClient, uri: str, name: str, version: str | None, alias: str | None
) -> ModelVersion:
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not_found(err):
            raise CheckpointError(uri, f"registered model {name!r} does not exist") from err
        raise RegistryError(f"{uri}: {err.message}") from err
    try:
        if version == "latest" or alias == "latest":
            mvs = search_versions(client, name)
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
        if not_found(err) or getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE":
            what = f"alias {alias!r}" if alias is not None else f"version {version}"
            raise CheckpointError(uri, f"registered model {name!r} has no {what}") from err
        raise RegistryError(f"{uri}: {err.message}") from err


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """Turn ``mlflow://models/NAME/VERSION`` or ``mlflow://models/NAME@ALIAS`` into a weights URI.

    mergeflow versions answer their ``mergeflow.model.uri`` tag (the merged weights on S3).
    Other versions (an upstream team's) answer their download URI (the version's source or
    its LoggedModel's artifacts), with ``mlflow-artifacts:`` mapped onto the artifacts
    destination (``MERGEFLOW_MLFLOW_ARTIFACTS_DESTINATION``, default
    ``s3://<MERGEFLOW_BUCKET>/mlartifacts``, as the embedded stack runs it). ``@latest`` and
    ``/latest`` mean the highest version. Raises :class:`CheckpointError` for an unknown
    model, version or alias and for a rejected version that has no weights.
    """
    name, version, alias = parse_mlflow_uri(uri)
    client = make_client(tracking_uri)
    mv = _get_version(client, uri, name, version, alias)
    tags = dict(mv.tags or {})
    if T_MODEL_URI in tags:
        if not tags[T_MODEL_URI]:
            reason = tags.get(T_REASON) or "no reason recorded"
            raise CheckpointError(uri, f"version {mv.version} has no weights (rejected: {reason})")
        return tags[T_MODEL_URI]
    with mlflow_errors(f"resolving {uri}"):
        download = client.get_model_version_download_uri(name, str(mv.version))
    return _artifacts_to_storage(download)
