"""What the embedded stack starts and reports: a service's spec and status, and the common environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
"""Set for every process the stack starts and in :meth:`Stack.env`."""

CORE_SERVICES = ("s3", "prefect", "mlflow")


class ServiceSpec(BaseModel):
    """How to start one managed process.

    ``env`` is added to the stack's server environment (``os.environ`` + telemetry off);
    ``health_url`` (a GET answering <= ``health_max_status``) gates readiness, ``None``
    means "running is enough". ``ports`` must be free before start.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    url: str | None = None
    health_url: str | None = None
    health_max_status: int = 399
    ports: list[int] = Field(default_factory=list)
    stop_grace_s: float = 20.0


class ServiceStatus(BaseModel):
    """One line of `mergeflow status`."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int | None
    url: str | None
    running: bool
    healthy: bool
    log: str | None
