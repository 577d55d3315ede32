"""The MLflow client the registry uses: construction, paged version search, error mapping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Module level: this package is imported by the pipeline only (and by storage.schemes on
# first use of an mlflow:// URI), never by `mergeflow merge` on the light install.
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mergeflow.settings import Settings
from mergeflow.storage.registry.records import RegistryError

__all__ = [
    "aliases",
    "default_tracking_uri",
    "make_client",
    "mlflow_errors",
    "not_found",
    "quote",
    "search_versions",
]


@contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Turn an MlflowException raised inside into a RegistryError with ``what`` in front."""
    try:
        yield
    except MlflowException as err:
        raise RegistryError(f"{what}: {err.message}") from err


def not_found(err: Exception) -> bool:
    """Whether an MLflow error says the model, version or alias does not exist."""
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded stack's MLflow (`mergeflow up`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri

    return Settings().mlflow_url


def make_client(tracking_uri: str | None) -> MlflowClient:
    """A client whose tracking and registry URI are the same server."""
    uri = tracking_uri or default_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def quote(value: str) -> str:
    """Escape a value for a single-quoted MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def search_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of registered model ``name`` (all pages)."""
    out: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(
            filter_string=f"name = '{quote(name)}'", max_results=1000, page_token=token
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version of registered model ``name``; empty when the model does not exist."""
    try:
        return dict(client.get_registered_model(name).aliases or {})
    except MlflowException as err:
        if not_found(err):
            return {}
        raise
