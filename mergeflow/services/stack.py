"""The embedded service stack: `mergeflow up`, `down` and `status`.

Services (each detached in its own process group, recorded under ``<home>/run/``):

=========  ===================================================================
``s3``     SeaweedFS S3 server (:mod:`mergeflow.services.s3_server`), data under
           ``<home>/s3``. Only when :attr:`Settings.starts_s3`.
``prefect`` ``prefect server start`` on SQLite (``<home>/prefect/prefect.db``) or, in the
           production profile, on ``Settings.prefect_database_url``. UI on.
``mlflow`` ``mlflow server --workers 1`` on SQLite (``<home>/mlflow/mlflow.db``) or
           ``Settings.mlflow_backend_store_uri``; artifacts proxied to
           ``s3://<bucket>/mlartifacts``.
extras     any further command (e.g. the served deployments) added through
           :meth:`Stack.up` ``extra=`` or :meth:`Stack.start_process`; stopped first.
=========  ===================================================================

All data lives under ``home``, so lineage state survives ``down``/``up``. Every server
binds to ``Settings.host`` (127.0.0.1) and runs with telemetry off.

Python API::

    stack = Stack(Settings(home=..., prefect_port=..., ...))
    stack.up(extra=[stack.command("deployments", [...])])   # idempotent; waits for health
    stack.env()          # client env: PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*, ...
    stack.status()       # list[ServiceStatus]
    stack.down()         # idempotent; SIGTERM, wait, SIGKILL per process group
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergeflow.services import s3_server
from mergeflow.services.process import (
    ProcessRecord,
    StackError,
    healthy,
    is_running,
    port_free,
    read_record,
    read_records,
    spawn,
    stop,
    wait_healthy,
)
from mergeflow.services.specs import CORE_SERVICES, TELEMETRY_OFF, ServiceSpec, ServiceStatus
from mergeflow.services.webhook_setup import mlflow_webhook_env
from mergeflow.settings import Settings

__all__ = ["ServiceSpec", "ServiceStatus", "Stack", "StackError", "TELEMETRY_OFF"]


class Stack:
    """Start, stop and inspect the local services for one ``Settings.home``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()

    # ----------------------------------------------------------------- layout
    @property
    def home(self) -> Path:
        return self.settings.home

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    @property
    def s3_endpoint_url(self) -> str | None:
        """The S3 endpoint clients use: the local server, the setting, or AWS_ENDPOINT_URL."""
        if self.settings.starts_s3:
            return self._recorded_url("s3", self.settings.local_s3_url)
        return self.settings.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def prefect_api_url(self) -> str:
        """Prefect API URL of the running server (as recorded by `up`), else from settings."""
        return self._recorded_url("prefect", self.settings.prefect_ui_url) + "/api"

    @property
    def prefect_ui_url(self) -> str:
        return self._recorded_url("prefect", self.settings.prefect_ui_url)

    @property
    def mlflow_url(self) -> str:
        """MLflow tracking URI (and UI) of the running server, else from settings."""
        return self._recorded_url("mlflow", self.settings.mlflow_url)

    def _recorded_url(self, name: str, default: str) -> str:
        # A running stack keeps the ports it was started with, whatever MERGEFLOW_*_PORT says now.
        record = read_record(self.run_dir, name)
        return record.url if record is not None and record.url and is_running(record) else default

    def _s3_credentials_env(self) -> dict[str, str]:
        if self.settings.starts_s3:
            creds = s3_server.EMBEDDED_CREDENTIALS
            return {
                "AWS_ACCESS_KEY_ID": creds.access_key,
                "AWS_SECRET_ACCESS_KEY": creds.secret_key,
                "AWS_DEFAULT_REGION": creds.region,
            }
        # Production: whatever the standard AWS chain has (env, profile, instance role).
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        out = {k: os.environ[k] for k in keys if k in os.environ}
        out["AWS_DEFAULT_REGION"] = os.environ.get(
            "AWS_DEFAULT_REGION", self.settings.s3.region or "us-east-1"
        )
        return out

    def _s3_env(self) -> dict[str, str]:
        out = self._s3_credentials_env()
        endpoint = self.s3_endpoint_url
        if endpoint:
            out.update(
                AWS_ENDPOINT_URL=endpoint,
                AWS_ENDPOINT_URL_S3=endpoint,
                MLFLOW_S3_ENDPOINT_URL=endpoint,
            )
        return out

    def env(self) -> dict[str, str]:
        """Environment for client processes (flows, workers, tests) that use this stack.

        PREFECT_API_URL, MLFLOW_TRACKING_URI, the S3 endpoint (AWS_ENDPOINT_URL,
        AWS_ENDPOINT_URL_S3, MLFLOW_S3_ENDPOINT_URL), AWS credentials and region,
        MERGEFLOW_HOME / MERGEFLOW_BUCKET, and telemetry off.
        """
        out = dict(TELEMETRY_OFF)
        out.update(
            PREFECT_API_URL=self.prefect_api_url,
            MLFLOW_TRACKING_URI=self.mlflow_url,
            MERGEFLOW_HOME=str(self.home),
            MERGEFLOW_BUCKET=self.settings.bucket,
        )
        out.update(self._s3_env())
        if not self.settings.prefect_database_url:  # SQLite: ride out longer write contention
            out["PREFECT_CLIENT_MAX_RETRIES"] = os.environ.get("PREFECT_CLIENT_MAX_RETRIES", "8")
        return out

    def _server_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TELEMETRY_OFF)
        env.update(extra or {})
        return env

    # ------------------------------------------------------------------ specs
    def _s3_spec(self) -> ServiceSpec:
        port = self.settings.s3_port
        data_dir = self.home / "s3"
        return ServiceSpec(
            name="s3",
            argv=s3_server.weed_command(data_dir, port),
            cwd=data_dir,  # weed reads ./master.toml
            url=self.settings.local_s3_url,
            health_url=None,  # authenticated ListBuckets instead, see _wait
            ports=[port + i for i in range(s3_server.PORTS_PER_SERVER)],
            stop_grace_s=5.0,  # writes are acknowledged only once on disk
        )

    def _prefect_spec(self) -> ServiceSpec:
        s = self.settings
        prefect_home = self.home / "prefect"
        db_url = s.prefect_database_url
        if s.profile == "production" and not db_url:
            raise StackError("production profile: set MERGEFLOW_PREFECT_DATABASE_URL")
        # On SQLite (docs/reliability.md, Load): every server transaction begins IMMEDIATE
        # (services/prefect_sqlite.py), so writers wait for each other instead of failing
        # with "database is locked", and any lock a client still retries (503) is logged,
        # not hidden. The environment's value wins.
        wanted = {"PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
        db_url = db_url or f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
        sqlite_db = db_url.startswith("sqlite")
        sqlite = {k: v for k, v in wanted.items() if k not in os.environ} if sqlite_db else {}
        env = {
            **sqlite,
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_DATABASE_CONNECTION_URL": db_url,
            "PREFECT_API_URL": s.prefect_api_url,  # the UI talks to this server
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            # Recovery times (docs/reliability.md): a queued fold run retries its lineage's
            # deployment slot every 10 s (Prefect's default: 30 s; each retry is a state write,
            # which SQLite serialises) and expired leases are reclaimed every 5 s (15 s).
            # Either can be overridden from the environment.
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": os.environ.get(
                "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "10"
            ),
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": os.environ.get(
                "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "5"
            ),
            # Concurrency leases on disk (under PREFECT_HOME), not in memory: a restarted
            # server still knows which run holds a lineage's lock (docs/reliability.md).
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get(
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
                "prefect.server.concurrency.lease_storage.filesystem",
            ),
        }
        return ServiceSpec(
            name="prefect",
            argv=[
                sys.executable,
                "-m",
                "mergeflow.services.prefect_sqlite" if sqlite_db else "prefect",
                "server",
                "start",
                "--host",
                s.host,
                "--port",
                str(s.prefect_port),
            ],
            env=env,
            cwd=prefect_home,
            url=s.prefect_ui_url,
            health_url=f"{s.prefect_api_url}/health",
            ports=[s.prefect_port],
        )

    def _mlflow_spec(self) -> ServiceSpec:
        s = self.settings
        mlflow_home = self.home / "mlflow"
        backend = s.mlflow_backend_store_uri
        if s.profile == "production" and not backend:
            raise StackError("production profile: set MERGEFLOW_MLFLOW_BACKEND_STORE_URI")
        backend = backend or f"sqlite:///{mlflow_home / 'mlflow.db'}"
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self._s3_env()}
        env.update(mlflow_webhook_env(mlflow_home, s.host))  # webhooks to the local receiver
        return ServiceSpec(
            name="mlflow",
            argv=[
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                s.host,
                "--port",
                str(s.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend,
                "--serve-artifacts",
                "--artifacts-destination",
                s.artifacts_destination,
            ],
            env=env,
            cwd=mlflow_home,
            url=s.mlflow_url,
            health_url=f"{s.mlflow_url}/health",
            ports=[s.mlflow_port],
        )

    def core_specs(self) -> list[ServiceSpec]:
        """The servers `up` starts, in start order."""
        specs = [self._s3_spec()] if self.settings.starts_s3 else []
        return specs + [self._prefect_spec(), self._mlflow_spec()]

    def command(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        health_url: str | None = None,
        cwd: Path | None = None,
    ) -> ServiceSpec:
        """A spec for an extra process (e.g. ``mergeflow serve``) with the client env.

        Its environment is ``os.environ`` + :meth:`env` + ``env``; the log goes to
        ``<home>/run/<name>.log``; ``down`` stops it before the servers.
        """
        return ServiceSpec(
            name=name,
            argv=list(argv),
            env={**self.env(), **(env or {})},
            cwd=cwd or self.home,
            health_url=health_url,
        )

    # ------------------------------------------------------------- lifecycle
    def up(
        self, extra: Sequence[ServiceSpec] = (), *, timeout: float | None = None
    ) -> list[ServiceStatus]:
        """Start what is not running yet, wait until all answer health, return `status()`.

        Idempotent: healthy services are left alone; a recorded service that died is
        restarted. On failure everything this call started is stopped again and a
        StackError carries the failing service's log tail.
        """
        timeout = timeout if timeout is not None else self.settings.health_timeout_s
        self.home.mkdir(parents=True, exist_ok=True)
        started: list[ServiceSpec] = []
        try:
            core = self.core_specs()
            # Servers start together; the S3 bucket is made once S3 answers.
            for spec in core:
                if self._ensure_started(spec) is not None:
                    started.append(spec)
            for spec in core:
                self._wait(spec, timeout)
            if self.settings.starts_s3:
                s3_server.ensure_bucket(self.s3_endpoint_url or "", self.settings.bucket)
            for spec in extra:
                if self._ensure_started(spec) is not None:
                    started.append(spec)
                self._wait(spec, timeout)
        except BaseException:
            for spec in reversed(started):
                record = read_record(self.run_dir, spec.name)
                if record is not None:
                    self._stop(record, spec.stop_grace_s)
            raise
        return self.status()

    def start_process(self, spec: ServiceSpec, *, timeout: float | None = None) -> ServiceStatus:
        """Start one extra process (idempotent) and wait for its health check.

        This is the hook for the served deployments: build the spec with :meth:`command`.
        """
        timeout = timeout if timeout is not None else self.settings.health_timeout_s
        record = self._ensure_started(spec)
        try:
            self._wait(spec, timeout)
        except BaseException:
            if record is not None:
                self._stop(record, spec.stop_grace_s)
            raise
        return self._status_of(read_record(self.run_dir, spec.name), spec.name, spec.url)

    def stop_process(self, name: str, *, timeout: float = 20.0) -> bool:
        """Stop one recorded process; True if it was running."""
        record = read_record(self.run_dir, name)
        return record is not None and self._stop(record, timeout)

    def _stop(self, record: ProcessRecord, timeout: float) -> bool:
        """Stop one recorded process; the object store's sockets in /tmp go with it."""
        was_running = stop(record, self.run_dir, timeout)
        if record.name == "s3" and record.port is not None:
            s3_server.remove_sockets(record.port)
        return was_running

    def down(self, *, timeout: float = 20.0, only: Collection[str] | None = None) -> list[str]:
        """Stop every recorded process (or those named in ``only``): extras first, then
        MLflow, Prefect, S3.

        SIGTERM to each process group, up to ``timeout`` seconds (5 for S3), then
        SIGKILL. Idempotent; returns the names that were running.
        """
        records = [r for r in read_records(self.run_dir) if only is None or r.name in only]
        extras = [r for r in records if r.name not in CORE_SERVICES]
        servers = [r for r in records if r.name in CORE_SERVICES]

        def stop_one(record: ProcessRecord) -> bool:
            return self._stop(record, 5.0 if record.name == "s3" else timeout)

        # Clients (served deployments) first, newest first; then the servers together:
        # nothing needs the object store while shutting down, and MLflow alone takes ~5 s.
        stopped = [r.name for r in reversed(extras) if stop_one(r)]
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            results = list(pool.map(stop_one, servers))
        order = {name: i for i, name in enumerate(("mlflow", "prefect", "s3"))}
        ran = [r.name for r, ok in zip(servers, results, strict=True) if ok]
        stopped += sorted(ran, key=lambda name: order[name])
        return stopped

    def status(self) -> list[ServiceStatus]:
        """Each core service (recorded or not) and each recorded extra process."""
        records = {r.name: r for r in read_records(self.run_dir)}
        names = self.core_names()
        names += [n for n in records if n not in names]
        urls = {
            "s3": self.s3_endpoint_url,
            "prefect": self.settings.prefect_ui_url,
            "mlflow": self.settings.mlflow_url,
        }
        return [self._status_of(records.get(n), n, urls.get(n)) for n in names]

    def core_names(self) -> list[str]:
        """The core services this stack runs: S3 only when it starts its own."""
        return [n for n in CORE_SERVICES if n != "s3" or self.settings.starts_s3]

    def running(self) -> set[str]:
        """Names of the recorded processes that are alive (a process check, no health probe).

        Use it to tell what a later :meth:`up` starts: a health probe can time out on a busy
        machine while the service runs, and whoever then "owns" the stack would stop it.
        """
        return {r.name for r in read_records(self.run_dir) if is_running(r)}

    def not_running(self) -> list[str]:
        """The core services whose process is not alive (see :meth:`running`)."""
        alive = self.running()
        return [name for name in self.core_names() if name not in alive]

    # ---------------------------------------------------------------- helpers
    def _status_of(self, record: ProcessRecord | None, name: str, url: str | None) -> ServiceStatus:
        if record is None:
            return ServiceStatus(
                name=name, pid=None, url=url, running=False, healthy=False, log=None
            )
        running = is_running(record)
        ok = running and (self._s3_ok() if name == "s3" else healthy(record))
        return ServiceStatus(
            name=name,
            pid=record.pid,
            url=record.url or url,
            running=running,
            healthy=ok,
            log=record.log,
        )

    def _s3_ok(self, timeout: float = 2.0) -> bool:
        return s3_server.is_healthy(self.s3_endpoint_url or "", timeout=timeout)

    def _ensure_started(self, spec: ServiceSpec) -> ProcessRecord | None:
        """Start `spec` unless its recorded process runs; return the new record or None."""
        record = read_record(self.run_dir, spec.name)
        if record is not None:
            if is_running(record):
                return None
            stop(record, self.run_dir, 1.0)  # forget the stale record (and stray members)
        busy = [p for p in spec.ports if not port_free(self.settings.host, p)]
        if busy:
            raise StackError(
                f"cannot start {spec.name}: port(s) {busy} on {self.settings.host} are in use "
                f"by another program; stop it or choose other ports (MERGEFLOW_*_PORT)"
            )
        return spawn(
            spec.name,
            spec.argv,
            env=self._server_env(spec.env),
            run_dir=self.run_dir,
            cwd=spec.cwd,
            url=spec.url,
            health_url=spec.health_url,
            health_max_status=spec.health_max_status,
            port=spec.ports[0] if spec.ports else None,
        )

    def _wait(self, spec: ServiceSpec, timeout: float) -> None:
        record = read_record(self.run_dir, spec.name)
        if record is None:
            raise StackError(f"{spec.name} has no run record under {self.run_dir}")
        check = (lambda: self._s3_ok(1.0)) if spec.name == "s3" else None
        wait_healthy(record, timeout, check=check)


def wait_down(stack: Stack, timeout: float = 10.0) -> bool:
    """True once no recorded process of `stack` runs (for tests and scripts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(is_running(r) for r in read_records(stack.run_dir)):
            return True
        time.sleep(0.1)
    return False
