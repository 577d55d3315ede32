"""Deployment settings, read from `MERGEFLOW_*` environment variables.

No secret lives here. S3 credentials come from the standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...), MLflow from
`MLFLOW_TRACKING_URI` and friends, Prefect from `PREFECT_API_URL`. Database URLs for
the production profile may carry a password; prefer trust/peer auth, `.pgpass` or an
IAM token in the environment over writing one into a URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_MIB = 1 << 20


class S3Settings(BaseSettings):
    """S3 client settings; every field reads ``MERGEFLOW_S3_<FIELD>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="MERGEFLOW_S3_", frozen=True)

    endpoint_url: str | None = None
    """None: boto3 decides (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS itself)."""
    region: str | None = None
    """None: boto3's region (AWS_DEFAULT_REGION, AWS_REGION, profile), else us-east-1."""
    addressing_style: str = "path"
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 8 * _MIB
    multipart_chunksize: int = 8 * _MIB
    max_concurrency: int = 4


class Settings(BaseSettings):
    """Where the stack runs and how clients reach it.

    Profiles:
      * ``embedded`` (default): `mergeflow up` starts a Prefect server and an MLflow server
        on SQLite under ``home`` plus a local S3 server (SeaweedFS) whose data also lives
        under ``home``, so lineage state survives `down`/`up`.
      * ``production``: Prefect and MLflow on PostgreSQL (``prefect_database_url``,
        ``mlflow_backend_store_uri``), S3 from the environment (:class:`S3Settings`'s
        ``MERGEFLOW_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``, else AWS itself). ``embedded_s3=True`` still starts the local
        S3 server, e.g. for a single box with PostgreSQL.
    """

    model_config = SettingsConfigDict(env_prefix="MERGEFLOW_", frozen=True, extra="ignore")

    home: Path = Field(default=Path("~/.mergeflow"), description="data, logs and pid files")
    profile: Literal["embedded", "production"] = "embedded"
    host: str = Field(default="127.0.0.1", description="interface every local server binds to")
    prefect_port: int = 4200
    mlflow_port: int = 5000
    s3_port: int = 8333
    bucket: str = Field(default="mergeflow", description="bucket for states, weights, artifacts")
    embedded_s3: bool | None = Field(
        default=None, description="start the local S3 server; default: only when embedded"
    )
    prefect_database_url: str | None = Field(
        default=None, description="production: postgresql+asyncpg://user@host:5432/db"
    )
    mlflow_backend_store_uri: str | None = Field(
        default=None, description="production: postgresql://user@host:5432/db"
    )
    mlflow_artifacts_destination: str | None = Field(
        default=None, description="default: s3://<bucket>/mlartifacts"
    )
    health_timeout_s: float = Field(default=180.0, gt=0, description="wait for each server")
    digest_cache: bool = Field(
        default=True,
        description="cache local checkpoints' digests under home/cache/digests, keyed by file identity",
    )

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return Path(value).expanduser().absolute()

    @property
    def run_dir(self) -> Path:
        """Pid, port and log files of the running stack."""
        return self.home / "run"

    @property
    def starts_s3(self) -> bool:
        """Whether `mergeflow up` starts the local S3 server."""
        if self.embedded_s3 is not None:
            return self.embedded_s3
        return self.profile == "embedded"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def local_s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def s3(self) -> S3Settings:
        """The S3 client settings (``MERGEFLOW_S3_*``)."""
        return S3Settings()

    @property
    def artifacts_destination(self) -> str:
        return self.mlflow_artifacts_destination or f"s3://{self.bucket}/mlartifacts"
