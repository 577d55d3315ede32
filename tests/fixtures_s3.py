"""Pytest fixtures for a real S3 API server (SeaweedFS on 127.0.0.1).

Registered once, in ``tests/conftest.py`` (``pytest_plugins = ["fixtures_s3", "fixtures_stack"]``).

- ``s3_server`` (session): one server in a temp dir on free ports; yields the
  :class:`~mergeflow.services.s3_server.ObjectStoreServer` (``endpoint_url``,
  ``credentials``, ``env()``, ``client()``) and owns the session bucket.
- ``s3_env`` (function): points boto3 at the server through the standard AWS
  variables (and removes profile/endpoint variables that could leak in).
- ``s3_bucket`` (function): an empty, unique ``s3://bucket/prefix`` location with
  ``s3_env`` applied. One bucket per session, a fresh prefix per test (creating a
  SeaweedFS bucket costs ~0.5 s: it allocates a volume).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mergeflow.services.s3_server import ObjectStoreServer

SESSION_BUCKET = "mergeflow-tests"


@dataclass(frozen=True)
class S3Location:
    """A scratch location on the test server."""

    bucket: str
    prefix: str
    endpoint_url: str
    server: ObjectStoreServer

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def client(self) -> Any:
        """A fresh boto3 client (safe to hook events on without touching shared clients)."""
        return self.server.client()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStoreServer]:
    server = ObjectStoreServer(tmp_path_factory.mktemp("seaweedfs"), port=None)
    server.start()
    try:
        server.ensure_bucket(SESSION_BUCKET)
        yield server
    finally:
        server.stop(grace=1.0)


@pytest.fixture
def s3_env(s3_server: ObjectStoreServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for var in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "MERGEFLOW_S3_ENDPOINT_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    env = s3_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_bucket(s3_server: ObjectStoreServer, s3_env: dict[str, str]) -> S3Location:
    return S3Location(
        SESSION_BUCKET, f"t-{uuid.uuid4().hex[:12]}", s3_server.endpoint_url, s3_server
    )
