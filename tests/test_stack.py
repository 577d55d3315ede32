"""`mergeflow up` / `status` / `down` on real servers in a temp home.

One test walks the whole life cycle (each `up` costs ~20 s on 2 cores): data written
before `down` (an S3 object, an MLflow run with an S3 artifact, a Prefect flow) is there
after the next `up`, an extra managed process (and its child) dies with `down`, and
`down` twice is fine.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mergeflow.cli import main
from mergeflow.services import s3_server
from mergeflow.services.process import (
    ephemeral_floor,
    free_port_block,
    http_ok,
    pid_alive,
    read_records,
)
from mergeflow.services.stack import Stack, StackError
from mergeflow.settings import Settings

if TYPE_CHECKING:
    from fixtures_stack import RunningStack


@pytest.fixture
def stack_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_stack_ports: dict[str, int]
) -> Settings:
    """A temp home on free ports, given to the CLI through MERGEFLOW_* variables."""
    for key in list(os.environ):
        if key.startswith("MERGEFLOW_"):
            monkeypatch.delenv(key)
    ports = free_stack_ports
    values = {
        "HOME": str(tmp_path / "home"),
        "S3_PORT": str(ports["s3_port"]),
        "PREFECT_PORT": str(ports["prefect_port"]),
        "MLFLOW_PORT": str(ports["mlflow_port"]),
        "HEALTH_TIMEOUT_S": "240",
    }
    for key, value in values.items():
        monkeypatch.setenv(f"MERGEFLOW_{key}", value)
    return Settings()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.services
@pytest.mark.slow
def test_up_status_down_keeps_data(
    stack_home: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = stack_home
    stack = Stack(settings)
    try:
        code, out = _cli(capsys, "up")
        assert code == 0, out
        assert f"Prefect UI:  {settings.prefect_ui_url}" in out
        assert f"MLflow UI:   {settings.mlflow_url}" in out

        code, out = _cli(capsys, "status")
        assert code == 0, out
        assert out.count("healthy") == 3, out
        code, out = _cli(capsys, "status", "--json")
        assert {s["name"]: s["healthy"] for s in json.loads(out)} == {
            "s3": True,
            "prefect": True,
            "mlflow": True,
        }
        assert _get_json(f"{settings.prefect_api_url}/health") is True
        code, out = _cli(capsys, "status", "--env")
        assert f"export PREFECT_API_URL={settings.prefect_api_url}" in out
        assert f"export MLFLOW_TRACKING_URI={settings.mlflow_url}" in out

        env = stack.env()
        s3 = _s3(env)
        s3.put_object(Bucket=settings.bucket, Key="persist/hello.txt", Body=b"still here")
        run_id = _log_mlflow_run(env["MLFLOW_TRACKING_URI"], tmp_path)
        # The MLflow artifact went through the server's proxy onto the object store.
        keys = [
            o["Key"]
            for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix="mlartifacts/").get(
                "Contents", []
            )
        ]
        assert any(k.endswith(f"{run_id}/artifacts/notes/lineage.txt") for k in keys), keys
        flow_id = _prefect_create_flow(settings.prefect_api_url)

        # An extra managed process (the hook for served deployments) with a child of its own.
        child_pid_file = tmp_path / "child.pid"
        code_text = (
            "import subprocess, sys, time;"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            f"open({str(child_pid_file)!r}, 'w').write(str(p.pid));"
            "time.sleep(600)"
        )
        extra = stack.start_process(stack.command("deployments", [sys.executable, "-c", code_text]))
        assert extra.running and extra.pid is not None
        deadline = time.monotonic() + 30
        while not child_pid_file.exists() or not child_pid_file.read_text():
            assert time.monotonic() < deadline, "the extra process never started its child"
            time.sleep(0.1)
        child_pid = int(child_pid_file.read_text())
        assert "deployments" in [s.name for s in stack.status()]

        pids = [r.pid for r in read_records(stack.run_dir)]
        assert s3_server.sockets(settings.s3_port), "weed made no unix socket in /tmp (moved?)"
        code, out = _cli(capsys, "down")
        assert code == 0, out
        assert "deployments" in out and "prefect" in out
        assert not any(pid_alive(p) for p in [*pids, child_pid])
        assert read_records(stack.run_dir) == []
        # (Ports are shared with other programs on this machine, so ask the servers.)
        assert not http_ok(f"{settings.prefect_api_url}/health")
        assert not http_ok(f"{settings.mlflow_url}/health")
        assert not s3_server.is_healthy(settings.local_s3_url, timeout=1.0)
        assert not s3_server.sockets(settings.s3_port)  # weed leaves them; down removes them
        code, out = _cli(capsys, "status")
        assert code == 1 and out.count("stopped") == 3, out
        code, out = _cli(capsys, "down")
        assert code == 0 and "nothing was running" in out

        # Up again on the same home: everything written before is still there.
        code, out = _cli(capsys, "up")
        assert code == 0, out
        body = _s3(env).get_object(Bucket=settings.bucket, Key="persist/hello.txt")["Body"]
        assert body.read() == b"still here"
        _check_mlflow_run(env["MLFLOW_TRACKING_URI"], run_id, tmp_path)
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(settings.prefect_api_url) as client:
            assert client.read_flow_by_name("mergeflow-stack-test").id == flow_id
    finally:
        stack.down(timeout=10)
    assert read_records(stack.run_dir) == []


@pytest.mark.parametrize("busy", ["s3_port", "mlflow_port"])
def test_up_refuses_a_busy_port_and_leaves_nothing_running(stack_home: Settings, busy: str) -> None:
    import socket

    settings = stack_home
    port = getattr(settings, busy)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((settings.host, port))
        sock.listen()
        with pytest.raises(StackError, match=rf"port\(s\) \[{port}\].*in use"):
            Stack(settings).up(timeout=30)
    assert read_records(settings.run_dir) == []


def test_production_profile_needs_database_urls(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, profile="production", prefect_database_url=None)
    with pytest.raises(StackError, match="MERGEFLOW_PREFECT_DATABASE_URL"):
        Stack(settings).up(timeout=5)
    assert not settings.starts_s3
    assert read_records(settings.run_dir) == []


def test_sqlite_prefect_settings_are_set_only_on_sqlite_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the stack starts Prefect's server with IMMEDIATE transactions, logs the locks
    that clients retry, and lets clients retry longer; PostgreSQL keeps Prefect's own server
    and defaults."""
    for var in ("PREFECT_API_LOG_RETRYABLE_ERRORS", "PREFECT_CLIENT_MAX_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    sqlite = Stack(Settings(home=tmp_path))
    spec = next(s for s in sqlite.core_specs() if s.name == "prefect")
    assert spec.argv[1:4] == ["-m", "mergeflow.services.prefect_sqlite", "server"]
    assert spec.env["PREFECT_API_LOG_RETRYABLE_ERRORS"] == "true"
    assert sqlite.env()["PREFECT_CLIENT_MAX_RETRIES"] == "8"
    monkeypatch.setenv("PREFECT_API_LOG_RETRYABLE_ERRORS", "false")
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "3")
    env = next(s.env for s in sqlite.core_specs() if s.name == "prefect")
    assert "PREFECT_API_LOG_RETRYABLE_ERRORS" not in env  # os.environ's value is used
    assert sqlite.env()["PREFECT_CLIENT_MAX_RETRIES"] == "3"
    monkeypatch.delenv("PREFECT_API_LOG_RETRYABLE_ERRORS")
    monkeypatch.delenv("PREFECT_CLIENT_MAX_RETRIES")
    pg = Stack(Settings(home=tmp_path, prefect_database_url="postgresql+asyncpg://x@127.0.0.1/db"))
    spec = next(s for s in pg.core_specs() if s.name == "prefect")
    assert spec.argv[1:4] == ["-m", "prefect", "server"]
    env = spec.env
    assert "PREFECT_API_LOG_RETRYABLE_ERRORS" not in env
    assert "PREFECT_CLIENT_MAX_RETRIES" not in pg.env()


async def _read_then_write_while_another_writes(config: Any) -> list[int]:
    """T1 reads, T2 inserts and commits, then T1 inserts: the classic stale-snapshot race."""
    from sqlalchemy import text

    engine = await config.engine()
    async with engine.connect() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    s1, s2 = await config.session(engine), await config.session(engine)
    t1_has_read = asyncio.Event()

    async def t1() -> None:
        async with s1, config.begin_transaction(s1):
            await s1.execute(text("SELECT count(*) FROM t"))
            t1_has_read.set()
            await asyncio.sleep(0.5)  # T2 writes now (DEFERRED) or waits for T1 (IMMEDIATE)
            await s1.execute(text("INSERT INTO t VALUES (1)"))

    async def t2() -> None:
        await t1_has_read.wait()
        async with s2, config.begin_transaction(s2):
            await s2.execute(text("INSERT INTO t VALUES (2)"))

    try:
        await asyncio.gather(t1(), t2())
        async with engine.connect() as conn:
            return sorted(r[0] for r in await conn.exec_driver_sql("SELECT x FROM t"))
    finally:
        await engine.dispose()


def test_immediate_sqlite_transactions_wait_where_prefects_deferred_ones_fail(
    tmp_path: Path,
) -> None:
    """The race that logs "database is locked" under load: Prefect's own SQLite configuration
    fails it at once; the stack's server configuration (every transaction IMMEDIATE) makes the
    second writer wait and both rows land."""
    from prefect.server.database.configurations import AioSqliteConfiguration
    from sqlalchemy.exc import OperationalError

    from mergeflow.services.prefect_sqlite import ImmediateSqliteConfiguration

    prefects = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(OperationalError, match="database is locked"):
        asyncio.run(_read_then_write_while_another_writes(prefects))
    ours = ImmediateSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    assert asyncio.run(_read_then_write_while_another_writes(ours)) == [1, 2]


@pytest.mark.parametrize("url", [None, "postgresql+asyncpg://x@127.0.0.1/db"])
def test_immediate_sqlite_launcher_refuses_a_database_that_is_not_sqlite(
    url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher names the variable and the URL, and installs no configuration."""
    from prefect.server.database.dependencies import MODELS_DEPENDENCIES

    from mergeflow.services import prefect_sqlite

    if url is None:
        monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    else:
        monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", url)
    before = MODELS_DEPENDENCIES.get("database_config")
    with pytest.raises(
        SystemExit, match="PREFECT_API_DATABASE_CONNECTION_URL must be a SQLite URL"
    ):
        prefect_sqlite.main()
    assert MODELS_DEPENDENCIES.get("database_config") is before


@pytest.mark.services
@pytest.mark.slow
def test_stack_fixture_points_in_process_clients_at_its_servers(
    stack: RunningStack, tmp_path: Path
) -> None:
    import mlflow
    from prefect import flow, get_client

    assert os.environ["PREFECT_API_URL"] == stack.prefect_api_url
    assert os.environ["AWS_ENDPOINT_URL_S3"] == stack.s3_endpoint_url

    @flow(name="mergeflow-fixture-hello", persist_result=False)
    def hello() -> str:
        return "hi"

    state = hello(return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.state is not None and run.state.is_completed()

    mlflow.set_experiment("mergeflow-fixture")
    with mlflow.start_run() as run:
        note = tmp_path / "n.txt"
        note.write_text("x")
        mlflow.log_artifact(str(note))
    assert mlflow.get_tracking_uri() == stack.mlflow_url
    listing = stack.s3_client().list_objects_v2(
        Bucket=stack.bucket, Prefix=f"mlartifacts/{run.info.experiment_id}/{run.info.run_id}/"
    )  # one run's prefix: the session's registry holds more than a page (1000 keys) of others
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/n.txt") for k in keys), keys


@pytest.mark.services
@pytest.mark.slow
def test_a_timed_out_health_probe_does_not_hide_a_running_stack(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy machine a health answer can come late. Who owns the stack (the demo's
    --stop stops only what it started) and whether the CLI finds it go by process: the
    demo once took a slow probe for a stopped stack and with --stop took the stack down."""
    from mergeflow.cli import stackenv
    from mergeflow.services import stack as stack_module

    local = Stack(stack.settings)
    monkeypatch.setattr(stack_module, "healthy", lambda record: False)
    monkeypatch.setattr(stack_module.s3_server, "is_healthy", lambda *a, **k: False)
    assert not any(s.healthy for s in local.status())  # the probe "times out" ...
    assert local.running() >= {"s3", "prefect", "mlflow"}  # ... the processes run
    monkeypatch.delenv("PREFECT_API_URL")
    for key, value in {
        "HOME": str(stack.home),
        "S3_PORT": str(stack.settings.s3_port),
        "PREFECT_PORT": str(stack.settings.prefect_port),
        "MLFLOW_PORT": str(stack.settings.mlflow_port),
    }.items():
        monkeypatch.setenv(f"MERGEFLOW_{key}", value)
    stackenv.use_stack_env()  # no "no Prefect server configured"
    assert os.environ["PREFECT_API_URL"] == stack.prefect_api_url


# ----------------------------------------------------------------------------- helpers
def _s3(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )


def _log_mlflow_run(tracking_uri: str, tmp_path: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("mergeflow-stack-test")
    run = client.create_run(experiment_id, run_name="persist")
    client.log_param(run.info.run_id, "method", "opcm")
    client.log_metric(run.info.run_id, "accuracy", 0.75, step=1)
    note = tmp_path / "lineage.txt"
    note.write_text("v1 <- base")
    client.log_artifact(run.info.run_id, str(note), artifact_path="notes")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _check_mlflow_run(tracking_uri: str, run_id: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params == {"method": "opcm"}
    assert run.data.metrics == {"accuracy": 0.75}
    out = client.download_artifacts(run_id, "notes/lineage.txt", str(tmp_path / "dl"))
    assert Path(out).read_text() == "v1 <- base"


def _prefect_create_flow(api_url: str):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        return client.create_flow_from_name("mergeflow-stack-test")


def test_settings_come_from_mergeflow_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MERGEFLOW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", "/home/someone")
    assert Settings().home == Path("/home/someone/.mergeflow")
    assert Settings().starts_s3 and Settings().artifacts_destination == "s3://mergeflow/mlartifacts"
    monkeypatch.setenv("MERGEFLOW_PROFILE", "production")
    monkeypatch.setenv("MERGEFLOW_PREFECT_PORT", "4300")
    monkeypatch.setenv("MERGEFLOW_BUCKET", "models")
    monkeypatch.setenv("MERGEFLOW_EMBEDDED_S3", "true")
    s = Settings()
    assert (s.profile, s.prefect_api_url, s.starts_s3) == (
        "production",
        "http://127.0.0.1:4300/api",
        True,
    )
    assert s.artifacts_destination == "s3://models/mlartifacts"
    monkeypatch.setenv("MERGEFLOW_PROFILE", "staging")
    with pytest.raises(ValueError, match="profile"):
        Settings()


def test_a_self_picked_store_port_block_stays_below_the_ephemeral_range() -> None:
    """A port free when checked but above the kernel's ephemeral floor can become a client
    connection's local end before the store binds it ("address already in use")."""
    floor = ephemeral_floor()
    assert 1024 < floor <= 65535
    for _ in range(20):
        p = free_port_block(s3_server.PORTS_PER_SERVER)
        assert 20000 <= p and p + s3_server.PORTS_PER_SERVER <= floor
