"""Auth, secrets and binding on the REAL stack (docs/security.md).

- every server the embedded stack starts (Prefect, MLflow, SeaweedFS and their children)
  listens on 127.0.0.1 only, read from the processes' listening sockets;
- no secret reaches anything a fold produced: a fold run with a recognisable S3 secret,
  then a grep of the stack's logs, the Prefect flow runs (parameters, logs, variables,
  artifacts), MLflow (runs' params, tags and artifacts, versions' tags and descriptions),
  and every object under the lineage's store; and an S3 error caused by a wrong secret
  does not quote it;
- MLflow with basic auth (``mlflow server --app-name basic-auth``): mergeflow registers with
  ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``; without them it stops with one clear message;
  the password appears in none of the registered run's data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

pytestmark = [pytest.mark.services]

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pid: int) -> list[tuple[str, int, int]]:
    import psutil

    out = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, proc.pid) for c in conns if c.status == "LISTEN"]
    return out


def test_every_stack_server_listens_on_loopback_only(stack: RunningStack) -> None:
    statuses = [s for s in stack.stack.status() if s.pid and s.running]
    assert {"prefect", "mlflow"} <= {s.name for s in statuses}, statuses
    sockets = [(s.name, *sock) for s in statuses for sock in _listening(int(s.pid or 0))]
    assert sockets, "found no listening socket"
    exposed = [s for s in sockets if s[1] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    print(
        f"RELIABILITY binding: {len(sockets)} listening sockets of {len(statuses)} services, all on loopback"
    )


# ----------------------------------------------------------------------------- secrets
def _prefect_texts(lineage: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    texts = []
    with get_client(sync_client=True) as client:
        runs = [
            r
            for r in client.read_flow_runs(limit=200)
            if lineage in (r.name or "") or lineage in json.dumps(r.parameters, default=str)
        ]
        assert runs
        ids = [r.id for r in runs]
        texts += [json.dumps(r.model_dump(mode="json"), default=str) for r in runs]
        texts += [
            lg.message
            for lg in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200
            )
        ]
        texts += [
            json.dumps(v.model_dump(mode="json"), default=str) for v in client.read_variables()
        ]
        texts += [
            json.dumps(a.model_dump(mode="json"), default=str)
            for a in client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
            )
        ]
    return texts


def _mlflow_texts(model: str, lineage: str, tracking_uri: str | None = None) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    texts = []
    for mv in client.search_model_versions(f"name = '{model}'"):
        texts += [json.dumps(dict(mv.tags)), mv.description or "", mv.source or ""]
    exp = client.get_experiment_by_name(f"mergeflow/{lineage}")
    assert exp is not None
    for run in client.search_runs([exp.experiment_id]):
        texts += [
            json.dumps(run.data.params),
            json.dumps(run.data.tags),
            json.dumps(run.data.metrics),
        ]
        for art in client.list_artifacts(run.info.run_id):
            if (
                not art.is_dir
                and art.file_size
                and art.file_size < 2**20
                and not art.path.endswith(".png")
            ):
                local = client.download_artifacts(run.info.run_id, art.path)
                texts.append(Path(local).read_text(errors="replace"))
    return texts


def _store_texts(uri: str) -> list[str]:
    from mergeflow.storage.schemes import open_store

    store = open_store(uri)
    return [
        store.read_bytes(o.relpath).decode(errors="replace")
        for o in store.list("")
        if not o.relpath.endswith(".safetensors") and o.size < 2**20
    ]


@pytest.mark.slow
def test_no_secret_in_anything_a_fold_produced(stack: RunningStack, tmp_path: Path) -> None:
    from test_flows import build_mlp_suite, lineage_spec

    from mergeflow.errors import ConfigError
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import save_lineage
    from mergeflow.storage.s3 import S3Store

    secret = stack.env["AWS_SECRET_ACCESS_KEY"]
    suite = build_mlp_suite(tmp_path / "suite")
    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/secret-{tag}"
    spec = save_lineage(
        lineage_spec(f"secret-{tag}", suite, prefix, sources=(str(suite.root / "checkpoints"),))
    )
    outs = backfill_flow(spec.name, [str(suite.checkpoints["t1"]), str(suite.checkpoints["bad"])])
    assert [o.status for o in outs] == ["accepted", "rejected"]
    texts: dict[str, list[str]] = {
        "stack logs": [p.read_text(errors="replace") for p in stack.stack.run_dir.glob("*.log")],
        "prefect": _prefect_texts(spec.name),
        "mlflow": _mlflow_texts(spec.registered_model, spec.name),
        "store": _store_texts(spec.store),
    }
    leaks = {where: sum(secret in t for t in ts) for where, ts in texts.items()}
    assert not any(leaks.values()), f"the S3 secret appears in: {leaks}"
    # an error caused by a wrong secret names the endpoint and the fix, not the secret
    wrong = f"WRONG-{uuid.uuid4().hex}"
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=wrong,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(ConfigError) as err:
        S3Store.from_uri(spec.store, client=client).list("")
    assert "access denied" in str(err.value) and wrong not in str(err.value)
    n = sum(len(ts) for ts in texts.values())
    print(
        f"RELIABILITY secrets: {n} texts grepped ({', '.join(f'{k} {len(v)}' for k, v in texts.items())}): 0 leaks"
    )


# ----------------------------------------------------------------------------- least privilege
SCOPED_ACTIONS = (
    # docs/security.md's policy, in SeaweedFS' terms: read and list the source bucket; read,
    # write, list and delete only under the store prefix lineages/ (no bucket-wide right)
    "Read:published",
    "List:published",
    "Read:mergeflow/lineages/*",
    "Write:mergeflow/lineages/*",
    "List:mergeflow/lineages/*",
)


@pytest.mark.slow
def test_a_lineage_folds_and_collects_with_least_privilege_s3_credentials(
    stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folds, registration and gc with credentials scoped as docs/security.md says, on a real
    S3 server that enforces them: nothing needs more, and the scope is real (a write to
    the source and one outside the store prefix are refused, with a clear message)."""
    from test_flows import build_mlp_suite, lineage_spec, publish

    from mergeflow.errors import ConfigError
    from mergeflow.flows.fold import fold_flow
    from mergeflow.flows.maintenance import gc_flow
    from mergeflow.lineage import save_lineage
    from mergeflow.services.s3_server import ObjectStoreServer, S3Credentials, ScopedIdentity
    from mergeflow.storage.schemes import open_store

    scoped = S3Credentials(access_key="mergeflow-scoped", secret_key=f"sc-{uuid.uuid4().hex}")
    server = ObjectStoreServer(
        tmp_path / "s3", scoped=[ScopedIdentity("mergeflow-scoped", scoped, SCOPED_ACTIONS)]
    )
    suite = build_mlp_suite(tmp_path / "suite")
    tag = uuid.uuid4().hex[:6]
    with server:
        server.ensure_bucket("published")
        server.ensure_bucket("mergeflow")
        for key, value in server.env().items():  # the team's publisher: full rights
            monkeypatch.setenv(key, value)
        for ck in ("t1", "t2"):
            publish(f"s3://published/team-{tag}", suite, ck)
        admin = server.client()

        def keys(bucket: str) -> list[str]:
            pages = admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

        published = keys("published")
        for key, value in scoped.env(server.endpoint_url).items():  # mergeflow: scoped
            monkeypatch.setenv(key, value)
        spec = save_lineage(
            lineage_spec(
                f"scoped-{tag}",
                suite,
                f"s3://published/team-{tag}",
                store=f"s3://mergeflow/lineages/scoped-{tag}",
            )
        )
        outs = fold_flow(spec.name, checkpoint_id="t2")
        assert [(o.checkpoint_id, o.status) for o in outs] == [
            ("t1", "accepted"),
            ("t2", "accepted"),
        ]
        orphan = open_store(f"{spec.store}/steps/9999-orphan/state")
        orphan.write_bytes("state.json", b"{}")
        assert gc_flow(spec.name) == [f"{spec.store}/steps/9999-orphan"]

        assert keys("published") == published, "mergeflow changed the source"
        outside = [k for k in keys("mergeflow") if not k.startswith("lineages/")]
        assert not outside, f"mergeflow wrote outside its store prefix: {outside}"
        assert not any("9999-orphan" in k for k in keys("mergeflow"))
        for uri in (f"s3://published/team-{tag}/published/t1", "s3://mergeflow/elsewhere"):
            with pytest.raises(ConfigError, match="access denied") as err:
                open_store(uri).write_bytes("x", b"x")
            assert scoped.secret_key not in str(err.value)
    print(
        f"RELIABILITY least privilege: 2 folds, registration and gc with {len(SCOPED_ACTIONS)} "
        "scoped rights; writes to the source and outside lineages/ refused"
    )


# ----------------------------------------------------------------------------- MLflow auth
@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An MLflow server with basic auth; yields (url, admin password, server log)."""
    from fixtures_stack import pick_ports

    from mergeflow.services.process import log_tail

    home = tmp_path_factory.mktemp("mlflow-auth")
    port = pick_ports()["mlflow_port"]
    admin_password = f"adm-{uuid.uuid4().hex}"
    ini = home / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{home / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_"))
    } | {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,  # CSRF key of the auth app
    }
    log = home / "server.log"
    argv = [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "artifacts"),
    ]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=home)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log_tail(log, 40)
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the basic-auth MLflow did not start\n{log_tail(log, 40)}")
    try:
        yield url, admin_password, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.reliability
@pytest.mark.timeout(1200)
def test_mlflow_basic_auth(
    stack: RunningStack, auth_mlflow: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from mergeflow.storage.registry import FoldRecord, Registry, RegistryError

    url, admin_password, log = auth_mlflow
    user, password = "mergeflow", f"pw-{uuid.uuid4().hex}"
    r = httpx.post(
        f"{url}/api/2.0/mlflow/users/create",
        json={"username": user, "password": password},
        auth=("admin", admin_password),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    rec = FoldRecord(
        lineage="auth", registered_model=f"auth-{uuid.uuid4().hex[:6]}", step=1,
        checkpoint_id="c1", checkpoint_uri="/nowhere/c1", checkpoint_digest="sha256:c1",
        parent_version=None, method="task_arithmetic", base_uri="/nowhere/base",
        state_uri="", model_uri="", status="rejected", reason="test",
    )  # fmt: skip
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RegistryError) as err:
        Registry(url).record_rejection(rec)
    print(f"RELIABILITY mlflow without credentials: {str(err.value)[:200]}")
    assert "401" in str(err.value) or "authenticat" in str(err.value).lower(), err.value
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    v = Registry(url).record_rejection(rec)
    assert v.status == "rejected" and v.checkpoint_id == "c1"
    texts = _mlflow_texts(rec.registered_model, rec.lineage, url) + [
        log.read_text(errors="replace")
    ]
    assert not any(password in t or admin_password in t for t in texts)
