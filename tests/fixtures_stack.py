"""Pytest fixtures that run the REAL service stack: Prefect server, MLflow server, S3 server.

Registered once, in ``tests/conftest.py`` (``pytest_plugins``); test modules just use the
fixtures (``tests/`` is on ``sys.path``: ``pythonpath`` in ``[tool.pytest.ini_options]``).

- ``stack`` (session): the embedded profile in a temp home on free ports: Prefect on
  SQLite, MLflow on SQLite with artifacts proxied to ``s3://mergeflow/mlartifacts`` on a
  SeaweedFS S3 server. While the session runs, ``os.environ`` holds its client env
  (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL(_S3), AWS credentials,
  MLFLOW_S3_ENDPOINT_URL, a temp PREFECT_HOME for clients) and Prefect's and MLflow's
  in-process settings follow it.
- ``postgres_stack_session`` (session): the production profile on one box: Prefect and
  MLflow on fresh PostgreSQL databases at 127.0.0.1:5432 (dropped at the end), S3 from
  its own SeaweedFS server. Does not touch the environment.
- ``postgres_stack`` (function): ``postgres_stack_session`` with its client env applied
  for one test (restored afterwards, so ``stack``'s env comes back).

Each yields a :class:`RunningStack`. Start-up on 2 busy cores can take 30 s or more, so
health waits are generous; on failure the error carries each server's log tail.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mergeflow.services import s3_server
from mergeflow.services.process import free_port_block, log_tail
from mergeflow.services.stack import Stack, StackError
from mergeflow.settings import Settings

HEALTH_TIMEOUT_S = 240.0
PG_HOST = "127.0.0.1"
PG_PORT = 5432
# Variables that must not leak from the developer's shell into stack clients.
_CLEARED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_KEY",
    "PREFECT_PROFILE",
    "MERGEFLOW_S3_ENDPOINT_URL",
)


@dataclass(frozen=True)
class RunningStack:
    """A started stack: its settings, URLs and the client environment."""

    stack: Stack
    env: dict[str, str]
    client_prefect_home: Path
    databases: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    @property
    def home(self) -> Path:
        return self.stack.home

    @property
    def prefect_api_url(self) -> str:
        return self.settings.prefect_api_url

    @property
    def prefect_ui_url(self) -> str:
        return self.settings.prefect_ui_url

    @property
    def mlflow_url(self) -> str:
        return self.settings.mlflow_url

    @property
    def s3_endpoint_url(self) -> str:
        url = self.stack.s3_endpoint_url
        assert url is not None
        return url

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def s3_client(self) -> Any:
        """A fresh boto3 S3 client for the stack's object store."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def sql(self, service: str, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of `query` in this stack's PostgreSQL database for `service` (prefect|mlflow)."""
        import psycopg2

        url = (
            self.settings.prefect_database_url
            if service == "prefect"
            else self.settings.mlflow_backend_store_uri
        )
        if not url or service not in self.databases:
            raise ValueError(f"{service} does not run on PostgreSQL in this stack")
        user = url.split("://", 1)[1].split("@", 1)[0]
        conn = psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=user, dbname=self.databases[service]
        )
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            conn.close()

    def full_env(self) -> dict[str, str]:
        """Client env plus the client PREFECT_HOME, for subprocesses."""
        return {**self.env, "PREFECT_HOME": str(self.client_prefect_home)}


def pick_ports() -> dict[str, int]:
    """Free ports below the ephemeral range: an 8-port block for S3, one each for Prefect/MLflow.

    Below the ephemeral range (32768+ on Linux) so that a restart on the same ports does
    not collide with the local end of some client connection.
    """
    lo, hi = 20000, 32000
    s3 = free_port_block(s3_server.PORTS_PER_SERVER, start=lo, stop=hi)
    block = set(range(s3, s3 + s3_server.PORTS_PER_SERVER))
    singles: list[int] = []
    while len(singles) < 2:
        p = free_port_block(1, start=lo, stop=hi)
        if p not in block and p not in singles:
            singles.append(p)
    return {"s3_port": s3, "prefect_port": singles[0], "mlflow_port": singles[1]}


def _settings(home: Path, **overrides: Any) -> Settings:
    """Settings with every field explicit, so no MERGEFLOW_* variable of the shell leaks in."""
    values: dict[str, Any] = {
        "home": home,
        "profile": "embedded",
        "host": "127.0.0.1",
        "bucket": "mergeflow",
        "embedded_s3": None,
        "s3_endpoint_url": None,
        "s3_region": "us-east-1",
        "prefect_database_url": None,
        "mlflow_backend_store_uri": None,
        "mlflow_artifacts_destination": None,
        "device": "cpu",
        "health_timeout_s": HEALTH_TIMEOUT_S,
        **pick_ports(),
    }
    values.update(overrides)
    return Settings(**values)


def _start(settings: Settings) -> RunningStack:
    stack = Stack(settings)
    try:
        stack.up(timeout=HEALTH_TIMEOUT_S)
    except BaseException as err:
        logs = "\n".join(
            f"--- {p.name}\n{log_tail(p, 30)}" for p in sorted(stack.run_dir.glob("*.log"))
        )
        stack.down(timeout=5)
        if isinstance(err, StackError):
            pytest.fail(f"the test stack did not start: {err}\n{logs}", pytrace=False)
        raise
    client_home = settings.home / "prefect-client"
    client_home.mkdir(parents=True, exist_ok=True)
    return RunningStack(stack=stack, env=stack.env(), client_prefect_home=client_home)


def _drain_prefect_workers() -> None:
    """Send queued Prefect logs and events to the server they were meant for, then drop
    the background workers (they keep the API URL they were created with)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5, at_exit=False)


def _refresh_clients() -> None:
    """Make already-imported Prefect and MLflow read the (changed) environment again."""
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
        with contextlib.suppress(Exception):
            mlflow.set_registry_uri(os.environ.get("MLFLOW_TRACKING_URI"))


@contextlib.contextmanager
def use_stack_env(running: RunningStack) -> Iterator[dict[str, str]]:
    """Point this process's clients at `running` inside the block; restore afterwards."""
    mp = pytest.MonkeyPatch()
    _drain_prefect_workers()
    try:
        for var in _CLEARED:
            mp.delenv(var, raising=False)
        for key, value in running.full_env().items():
            mp.setenv(key, value)
        _refresh_clients()
        yield running.full_env()
    finally:
        _drain_prefect_workers()
        mp.undo()
        _refresh_clients()


def _stop(running: RunningStack) -> None:
    running.stack.down(timeout=10)


_SESSION: list[RunningStack] = []  # the session stack, once started


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The embedded stack for the whole session, with its env applied to ``os.environ``."""
    running = _start(_settings(tmp_path_factory.mktemp("stack-home")))
    _SESSION.append(running)
    try:
        with use_stack_env(running):
            yield running
    finally:
        _SESSION.clear()
        _stop(running)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail at once, naming the cause, when a test needs the session stack and a process of
    it is gone: otherwise each later test waits out its own timeouts."""
    if not _SESSION or "stack" not in getattr(item, "fixturenames", ()):
        return
    stack = _SESSION[0].stack
    missing = stack.not_running()
    if missing:
        pytest.fail(
            f"the session stack lost {', '.join(missing)} (an earlier test stopped or killed it); "
            f"server logs under {stack.run_dir}",
            pytrace=False,
        )


# --------------------------------------------------------------------------- PostgreSQL
def _pg_connect(dbname: str | None = None) -> tuple[Any, str]:
    """An autocommit connection to the local PostgreSQL and the user it runs as."""
    import psycopg2

    errors = []
    users = [u for u in (os.environ.get("PGUSER"), "postgres", "root") if u]
    for user in dict.fromkeys(users):
        for db in [dbname] if dbname else ["postgres", "test", "template1"]:
            try:
                conn = psycopg2.connect(
                    host=PG_HOST, port=PG_PORT, user=user, dbname=db, connect_timeout=5
                )
            except psycopg2.Error as err:
                errors.append(f"{user}@{db}: {str(err).strip()}")
                continue
            conn.autocommit = True
            return conn, user
    pytest.fail(
        f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable with trust auth "
        f"(deselect with -m 'not postgres'): {'; '.join(errors)}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def postgres_stack_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Prefect and MLflow on fresh PostgreSQL databases, S3 on a local SeaweedFS server."""
    conn, user = _pg_connect()
    suffix = uuid.uuid4().hex[:10]
    dbs = {"prefect": f"mergeflow_prefect_{suffix}", "mlflow": f"mergeflow_mlflow_{suffix}"}
    try:
        with conn.cursor() as cur:
            for name in dbs.values():
                cur.execute(f'CREATE DATABASE "{name}"')
        base = f"{user}@{PG_HOST}:{PG_PORT}"
        settings = _settings(
            tmp_path_factory.mktemp("pg-stack-home"),
            profile="production",
            embedded_s3=True,
            prefect_database_url=f"postgresql+asyncpg://{base}/{dbs['prefect']}",
            mlflow_backend_store_uri=f"postgresql://{base}/{dbs['mlflow']}",
        )
        running = _start(settings)
        running = RunningStack(
            stack=running.stack,
            env=running.env,
            client_prefect_home=running.client_prefect_home,
            databases=dbs,
        )
        try:
            yield running
        finally:
            _stop(running)
    finally:
        with conn.cursor() as cur:
            for name in dbs.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture
def postgres_stack(postgres_stack_session: RunningStack) -> Iterator[RunningStack]:
    """``postgres_stack_session`` with its client env applied for this test only."""
    with use_stack_env(postgres_stack_session):
        yield postgres_stack_session


@pytest.fixture
def free_stack_ports() -> dict[str, int]:
    """Free ``s3_port`` (an 8-port block), ``prefect_port`` and ``mlflow_port``."""
    return pick_ports()
