"""Push-triggered folds: the webhook receiver.

Unit tests check the signature schemes (MLflow's HMAC, computed here by MLflow's own signing
function; the Hub's shared secret; SeaweedFS' bearer token), replays, refusals and the
notification parsers, with a recording dispatch in place of the Prefect side.

The services test runs the real path: the session MLflow server sends a signed
``model_version.created`` webhook to the receiver, the receiver runs ``mergeflow-push``, the
event triggers the served fold deployment and a version is registered; an unsigned request
is refused and emits nothing; a Hub webhook with the documented payload and secret, sent
from a test client, triggers a fold of a repo on the Hub stand-in.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers.cli import start_serve
from helpers.hub_standin import HubStandIn
from helpers.webhooks import (
    HUB_SECRET,
    MLFLOW_SECRET,
    TOKEN,
    Recorder,
    hub_payload,
    make_receiver,
    mlflow_request,
    version_created,
)
from huggingface_hub import constants as hf_constants
from pydantic import SecretStr
from test_flows import build_mlp_suite, flow_runs, wait_for_version

from mergeflow.services.notifications import (
    hub_notification,
    s3_notifications,
    seaweedfs_notification,
)
from mergeflow.services.receiver import Receiver, ReceiverSettings, ReplayGuard

if TYPE_CHECKING:
    from fixtures_stack import RunningStack


# ----------------------------------------------------------------------------- unit
def test_mlflow_signatures_replays_and_refusals() -> None:
    rec = Recorder()
    r = make_receiver(rec)
    headers, body = mlflow_request(version_created("upstream"))
    assert r.handle("POST", "/webhooks/mlflow", headers, body) == (
        200,
        {
            "status": "accepted",
            "subjects": ["models:/upstream/1"],
            "emitted": {"lin": ["models:/upstream/1"]},
        },
    )
    lower = {k.lower(): v for k, v in headers.items()}  # header names in any case
    status, doc = r.handle("POST", "/webhooks/mlflow", lower, body)
    assert (status, doc["reason"]) == (409, "replay of a request already handled")

    unsigned = {"Content-Type": "application/json"}
    status, doc = r.handle("POST", "/webhooks/mlflow", unsigned, body)
    assert status == 401 and "unsigned" in doc["reason"]
    for signature in ("v1,AAAA", headers["X-MLflow-Signature"].replace("v1", "v2")):
        fresh = mlflow_request(version_created("upstream"))[0]
        status, doc = r.handle(
            "POST", "/webhooks/mlflow", {**fresh, "X-MLflow-Signature": signature}, body
        )
        assert (status, doc["reason"]) == (403, "bad signature")
    tampered = body.replace(b"upstream", b"elsewhere")
    assert (
        r.handle("POST", "/webhooks/mlflow", mlflow_request(version_created("x"))[0], tampered)[0]
        == 403
    )
    old = mlflow_request(version_created("upstream"), timestamp=int(time.time()) - 3600)
    status, doc = r.handle("POST", "/webhooks/mlflow", *old)
    assert status == 403 and "tolerance 300 s" in doc["reason"]
    other = mlflow_request(version_created("upstream"), secret="not-the-secret")
    assert r.handle("POST", "/webhooks/mlflow", *other)[0] == 403
    assert (
        r.handle(
            "POST",
            "/webhooks/mlflow",
            *mlflow_request({"entity": "registered_model", "action": "created"}),
        )[1]["status"]
        == "ignored"
    )
    assert len(rec.seen) == 1  # only the first, valid request was dispatched

    closed = make_receiver(Recorder(), mlflow_secret=None)
    status, doc = closed.handle("POST", "/webhooks/mlflow", headers, body)
    assert status == 403 and "no secret is configured for MLflow" in doc["reason"]
    assert r.handle("GET", "/webhooks/mlflow", {}, b"")[0] == 405
    assert r.handle("POST", "/nowhere", {}, b"")[0] == 404
    assert r.handle("POST", "/webhooks/mlflow", *mlflow_request({"a": 1}))[1]["status"] == "ignored"
    h, _ = mlflow_request({})
    assert r.handle("POST", "/webhooks/mlflow", h, b"x" * (2 << 20))[0] == 413


def test_a_failed_dispatch_lets_the_retry_through() -> None:
    rec = Recorder(fail=1)
    r = make_receiver(rec)
    request = mlflow_request(version_created("upstream"))
    assert r.handle("POST", "/webhooks/mlflow", *request)[0] == 500
    assert r.handle("POST", "/webhooks/mlflow", *request)[0] == 200  # the sender's retry
    assert r.handle("POST", "/webhooks/mlflow", *request)[0] == 409
    assert [n.registered_model for n in rec.seen] == ["upstream"]


def test_hub_and_seaweedfs_secrets() -> None:
    rec = Recorder()
    r = make_receiver(rec)
    body = json.dumps(hub_payload("org/ft", "a" * 40)).encode()
    assert r.handle("POST", "/webhooks/hub", {}, body)[0] == 401
    assert r.handle("POST", "/webhooks/hub", {"X-Webhook-Secret": "wrong"}, body)[0] == 403
    assert r.handle("POST", "/webhooks/hub", {"X-Webhook-Secret": HUB_SECRET}, b"{nope")[0] == 400
    status, doc = r.handle("POST", "/webhooks/hub", {"X-Webhook-Secret": HUB_SECRET}, body)
    assert status == 200 and doc["subjects"] == [f"hf://org/ft@{'a' * 40}"]
    assert r.handle("POST", "/webhooks/hub", {"x-webhook-secret": HUB_SECRET}, body)[0] == 409
    dataset = json.dumps(hub_payload("org/data", "b" * 40, kind="dataset")).encode()
    assert (
        r.handle("POST", "/webhooks/hub", {"X-Webhook-Secret": HUB_SECRET}, dataset)[1]["status"]
        == "ignored"
    )

    event = {  # what SeaweedFS' filer webhook sent when a weight file was written
        "event_type": "create",
        "key": "/buckets/models/published/ck1/model.safetensors",
        "message": {
            "new_entry": {"name": "model.safetensors", "attributes": {"mtime": 1}},
            "new_parent_path": "/buckets/models/published/ck1",
        },
    }
    body = json.dumps(event).encode()
    assert r.handle("POST", "/webhooks/seaweedfs", {"Authorization": "Bearer nope"}, body)[0] == 403
    assert r.handle("POST", "/webhooks/seaweedfs", {"Authorization": TOKEN}, body)[0] == 401
    status, doc = r.handle(
        "POST", "/webhooks/seaweedfs", {"Authorization": f"Bearer {TOKEN}"}, body
    )
    assert status == 200 and doc["subjects"] == ["s3://models/published/ck1/model.safetensors"]
    assert [n.via for n in rec.seen] == ["hub", "seaweedfs"]
    assert [h[1] for h in r.history] == [401, 403, 400, 200, 409, 200, 403, 401, 200]


def test_notifications_name_the_sources_they_concern() -> None:
    from mergeflow.services.notifications import mlflow_notification

    m = mlflow_notification(version_created("up"))
    assert m is not None and m.concerns("mlflow://models/up") and m.concerns("models:/up")
    assert not m.concerns("mlflow://models/up2") and not m.concerns("mlflow://models/up/3")
    assert not m.concerns("s3://up/x")
    h = hub_notification(hub_payload("org/ft", "c" * 40))
    assert h is not None and h.concerns("hf://org/ft") and h.concerns("hf://org/ft@main")
    assert h.concerns("hf://?base_model=org/base") and not h.concerns("hf://org/other")
    s = seaweedfs_notification(
        {
            "event_type": "create",
            "key": "/buckets/b/pub/c1/model.safetensors",
            "message": {"new_entry": {}},
        }
    )
    assert (
        s is not None
        and s.concerns("s3://b/pub")
        and s.concerns("s3://b/pub/")
        and s.concerns("s3://b")
    )
    assert not s.concerns("s3://b/public") and not s.concerns("s3://other/pub")
    assert (
        seaweedfs_notification({"event_type": "delete", "key": "/buckets/b/x", "message": {}})
        is None
    )
    assert (
        seaweedfs_notification(
            {
                "event_type": "create",
                "key": "/buckets/b",
                "message": {"new_entry": {"is_directory": True}},
            }
        )
        is None
    )
    record = {
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "b"}, "object": {"key": "pub/c+1/model.safetensors"}},
    }
    sns = {
        "Type": "Notification",
        "Message": json.dumps(
            {"Records": [record, {**record, "eventName": "ObjectRemoved:Delete"}]}
        ),
    }
    (n,) = s3_notifications(sns)
    assert n.key == "pub/c 1/model.safetensors" and n.concerns("s3://b/pub")
    assert s3_notifications({"Event": "s3:TestEvent"}) == []
    guard = ReplayGuard(10.0, max_keys=2)
    assert guard.claim("a", now=0) and not guard.claim("a", now=5) and guard.claim("a", now=11)
    assert (
        guard.claim("b", now=11) and guard.claim("c", now=11) and guard.claim("a", now=12)
    )  # bounded


def test_the_http_server_answers_over_the_wire() -> None:
    rec = Recorder()
    with make_receiver(rec, port=0) as r:
        assert r.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{r.url}/health", timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        headers, body = mlflow_request(version_created("wire"))
        req = urllib.request.Request(f"{r.url}/webhooks/mlflow", body, headers, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["emitted"] == {"lin": ["models:/wire/1"]}
        bad = urllib.request.Request(
            f"{r.url}/webhooks/mlflow", body, {"Content-Type": "application/json"}, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=10)
        assert err.value.code == 401


# -------------------------------------------------------------------------- services
@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStandIn(tmp_path / "hub") as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, body, {"Content-Type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_for_fold_deployment(lineage: str, timeout: float = 120.0) -> None:
    """Until the lineage's served fold deployment and its event trigger exist."""
    from prefect.client.orchestration import get_client

    from mergeflow.flows.deployments import fold_deployment_name
    from mergeflow.flows.events import fold_trigger

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(fold_deployment_name(lineage))
                if client.read_automations_by_name(str(fold_trigger(lineage).name)):
                    return
            except Exception:
                pass
        time.sleep(1.0)
    pytest.fail("the fold deployment was not served in time")


@pytest.mark.services
@pytest.mark.slow
def test_signed_webhooks_trigger_folds_and_unsigned_ones_are_refused(
    stack: RunningStack, hub: HubStandIn, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from mergeflow.evaluation.spec import GateSpec
    from mergeflow.lineage import LineageSpec, save_lineage
    from mergeflow.services.webhook_setup import ensure_mlflow_webhook
    from mergeflow.storage.registry import Registry

    suite = build_mlp_suite(tmp_path / "suite")
    tag = uuid.uuid4().hex[:6]
    upstream = f"upstream-{tag}"
    hub.create_repo("org/ft-digits")  # no weights yet
    spec = save_lineage(
        LineageSpec(
            name=f"push-{tag}",
            base=str(suite.base),
            method="task_arithmetic",
            sources=(f"mlflow://models/{upstream}", "hf://org/ft-digits"),
            gate=GateSpec(),
            store=str(tmp_path / "lineage"),
            device="cpu",
            schedule="0 0 1 1 *",  # watch never runs: only pushes fold anything here
        )
    )
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    log = start_serve(stack.stack, f"serve-{tag}", [spec], "--no-receiver", env=env)
    settings = ReceiverSettings(
        port=0, mlflow_secret=SecretStr(MLFLOW_SECRET), hub_secret=SecretStr(HUB_SECRET)
    )
    client = MlflowClient()
    hook = None
    with Receiver(settings) as receiver:
        try:
            hook = ensure_mlflow_webhook(f"{receiver.url}/webhooks/mlflow", MLFLOW_SECRET)
            assert client.test_webhook(hook).success  # MLflow reaches the receiver, signed
            _wait_for_fold_deployment(spec.name)
            time.sleep(6)  # the server caches the webhook list for 5 s (MLFLOW_WEBHOOK_CACHE_TTL)

            # a team registers a fine-tuned checkpoint upstream: MLflow sends a signed webhook
            exp = client.create_experiment(f"{upstream}-training")
            client.create_registered_model(upstream)
            for i, ck in enumerate(("t1", "t3"), 1):
                run = client.create_run(exp)
                lm = client.create_logged_model(exp, name=ck, source_run_id=run.info.run_id)
                client.log_model_artifacts(lm.model_id, str(suite.checkpoints[ck]))
                client.finalize_logged_model(lm.model_id, "READY")
                if i == 2:  # the second one: no webhook, then a forged, unsigned notification
                    client.update_webhook(hook, status="DISABLED")
                    time.sleep(6)
                client.create_model_version(
                    upstream, f"models:/{lm.model_id}", run.info.run_id, model_id=lm.model_id
                )
            v = wait_for_version(spec.registered_model, f"{upstream}-v1", log)
            assert v.status == "accepted" and v.checkpoint_uri == f"mlflow://models/{upstream}/1"
            pushes = flow_runs("mergeflow-push", lineage=spec.name)
            assert pushes and all(r.parameters["via"] == "mlflow" for r in pushes)
            folds = flow_runs("mergeflow-fold", lineage=spec.name, checkpoint_id=f"{upstream}-v1")
            assert folds and all(r.created_by and r.created_by.type == "AUTOMATION" for r in folds)
            assert ("/webhooks/mlflow", 200, "accepted") in receiver.history

            forged = json.dumps(version_created(upstream, "2")).encode()
            assert _post(f"{receiver.url}/webhooks/mlflow", forged, {})[0] == 401
            wrong = {
                "X-MLflow-Signature": "v1,Zm9yZ2Vk",
                "X-MLflow-Delivery-Id": "d",
                "X-MLflow-Timestamp": str(int(time.time())),
            }
            assert _post(f"{receiver.url}/webhooks/mlflow", forged, wrong)[0] == 403

            # the Hub path: a fine-tune pushed to a repo the lineage watches, then the
            # documented payload and secret from a test client (pushed only now: a fold folds
            # every pending checkpoint published before its own, and the stand-in's clock is old)
            sha = hub.upload_folder("org/ft-digits", suite.checkpoints["t2"])
            body = json.dumps(hub_payload("org/ft-digits", sha)).encode()
            assert (
                _post(f"{receiver.url}/webhooks/hub", body, {"X-Webhook-Secret": "guess"})[0] == 403
            )
            code, doc = _post(
                f"{receiver.url}/webhooks/hub", body, {"X-Webhook-Secret": HUB_SECRET}
            )
            assert code == 200 and doc["emitted"] == {spec.name: [f"hf://org/ft-digits@{sha}"]}, doc
            assert (
                _post(f"{receiver.url}/webhooks/hub", body, {"X-Webhook-Secret": HUB_SECRET})[0]
                == 409
            )
            hv = wait_for_version(spec.registered_model, f"hf://org/ft-digits@{sha}", log)
            assert hv.status == "accepted" and hv.parent_version == v.version

            # nothing ever emitted the unsigned notification's checkpoint
            ids = [x.checkpoint_id for x in Registry().versions(spec.registered_model)]
            assert ids == [f"{upstream}-v1", f"hf://org/ft-digits@{sha}"]
            assert not flow_runs(
                "mergeflow-fold", lineage=spec.name, checkpoint_id=f"{upstream}-v2"
            )
        finally:
            if hook is not None:
                client.delete_webhook(hook)
            stack.stack.stop_process(f"serve-{tag}")


@pytest.mark.services
def test_seaweedfs_pushes_file_events_to_the_receiver(tmp_path: Path) -> None:
    """A real SeaweedFS with ``notification.toml`` calls the receiver when an object is written."""
    from mergeflow.services.s3_server import ObjectStoreServer

    rec = Recorder()
    with make_receiver(rec, port=0) as r:
        data = tmp_path / "weed"
        data.mkdir()
        (data / "notification.toml").write_text(
            "[notification.webhook]\nenabled = true\n"
            f'endpoint = "{r.url}/webhooks/seaweedfs"\nbearer_token = "{TOKEN}"\n'
        )
        with ObjectStoreServer(data, port=None) as server:
            server.ensure_bucket("pushes")
            key = "published/ck1/model.safetensors"
            server.client().put_object(Bucket="pushes", Key=key, Body=b"weights")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(n.key == key for n in rec.seen):
                time.sleep(0.2)
    (n,) = [n for n in rec.seen if n.key == key]
    assert n.via == "seaweedfs" and n.bucket == "pushes" and n.concerns("s3://pushes/published")
    assert all(status in (200, 409) for _, status, _ in r.history)  # every call was signed


@pytest.mark.services
def test_s3_event_notifications_are_read_from_sqs(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS S3 -> SQS -> ``poll_sqs``, against moto's SQS server (AWS cannot be reached here)."""
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    from mergeflow.services.process import free_port
    from mergeflow.services.receiver import poll_sqs

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        sqs = boto3.client(
            "sqs",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        queue = sqs.create_queue(QueueName="bucket-events")["QueueUrl"]
        record = {
            "eventSource": "aws:s3",
            "eventName": "ObjectCreated:CompleteMultipartUpload",
            "s3": {
                "bucket": {"name": "acme"},
                "object": {"key": "published/ft%2B1/model.safetensors"},
            },
        }
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Event": "s3:TestEvent"}))
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [record]}))
        rec, stop = Recorder(fail=1), threading.Event()  # the first dispatch fails: redelivered
        sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "1"})
        worker = threading.Thread(
            target=poll_sqs, args=(queue, rec), kwargs={"stop": stop, "client": sqs, "wait_s": 1}
        )
        worker.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not rec.seen:
            time.sleep(0.2)
        stop.set()
        worker.join(timeout=10)
        (n,) = rec.seen
        assert (n.bucket, n.key, n.via) == ("acme", "published/ft+1/model.safetensors", "s3")
        left = sqs.get_queue_attributes(
            QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"]
        )
        assert left["Attributes"]["ApproximateNumberOfMessages"] == "0"  # handled ones are deleted
    finally:
        server.stop()
