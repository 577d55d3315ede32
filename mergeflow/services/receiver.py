"""The webhook receiver: registry notifications in, ``mergeflow.checkpoint.published`` events out.

A small stdlib HTTP server bound to 127.0.0.1 (``MERGEFLOW_RECEIVER_HOST``/``_PORT``, default
port 8470), started by ``mergeflow up --receiver`` (a managed service that also registers the
MLflow webhook), by ``mergeflow serve`` (a thread, when a secret is configured and the port is
free), or alone with ``mergeflow receive``. Each verified notification names
what changed; for every lineage source it concerns, the ``mergeflow-push`` flow lists that
source and emits the same events watch emits (:mod:`mergeflow.flows.push`). Duplicates are
absorbed by the exactly-once fold; watch stays the safety net for anything missed.

==========================  ===================================================================
``POST /webhooks/mlflow``   MLflow 3 webhooks (``model_version.created``; SQL-backed servers
                            only). ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>`` over
                            ``<delivery id>.<timestamp>.<body>`` with the shared secret
                            (``MERGEFLOW_RECEIVER_MLFLOW_SECRET``), ``X-MLflow-Timestamp``
                            within ``tolerance_s`` of now, ``X-MLflow-Delivery-Id`` never seen.
``POST /webhooks/hub``      Hugging Face Hub webhooks (repo ``create``/``update`` of a model):
                            ``X-Webhook-Secret`` equal to ``MERGEFLOW_RECEIVER_HUB_SECRET``;
                            a body seen before is a replay.
``POST /webhooks/seaweedfs`` SeaweedFS filer notifications (``[notification.webhook]`` in
                            ``notification.toml``): ``Authorization: Bearer`` equal to
                            ``MERGEFLOW_RECEIVER_SEAWEEDFS_TOKEN``; a body seen before is a replay.
``GET /health``             200.
==========================  ===================================================================

Refusals are 4xx with a JSON reason, logged, and emit nothing: 401 unsigned, 403 bad
signature/secret/token, stale timestamp or an endpoint without a configured secret, 409 a
replay, 400 a malformed body, 404/405/413. Secrets are compared in constant time.

AWS S3 cannot call a URL; it sends event notifications to SQS, which :func:`poll_sqs`
reads with boto3 (``MERGEFLOW_RECEIVER_SQS_QUEUE_URL``; IAM authenticates the queue).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from mergeflow.services.notifications import (
    Notification,
    Refused,
    hub_notification,
    mlflow_notification,
    s3_notifications,
    seaweedfs_notification,
)

__all__ = [
    "Receiver",
    "ReceiverSettings",
    "ReplayGuard",
    "poll_sqs",
    "push_to_lineages",
    "verify_mlflow",
    "verify_token",
]

log = logging.getLogger("mergeflow.receiver")
MAX_BODY = 1 << 20
Dispatch = Callable[[Notification], dict[str, list[str]]]


class ReceiverSettings(BaseSettings):
    """``MERGEFLOW_RECEIVER_*``. A secret left unset closes its endpoint (every call is refused)."""

    model_config = SettingsConfigDict(env_prefix="MERGEFLOW_RECEIVER_", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8470
    mlflow_secret: SecretStr | None = None
    hub_secret: SecretStr | None = None
    seaweedfs_token: SecretStr | None = None
    tolerance_s: float = 300.0
    """How far an MLflow delivery's timestamp may be from now."""
    replay_ttl_s: float = 86400.0
    """How long a Hub or SeaweedFS body counts as seen."""
    sqs_queue_url: str | None = None


class ReplayGuard:
    """Keys seen within ``ttl_s`` (bounded): a claimed key is refused until it expires."""

    def __init__(self, ttl_s: float, max_keys: int = 100_000) -> None:
        self.ttl_s, self.max_keys = ttl_s, max_keys
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, key: str, now: float | None = None) -> bool:
        """True and remember ``key`` if it was not seen; False for a replay."""
        now = time.time() if now is None else now
        with self._lock:
            while self._seen and (
                next(iter(self._seen.values())) < now or len(self._seen) >= self.max_keys
            ):
                self._seen.popitem(last=False)
            if key in self._seen:
                return False
            self._seen[key] = now + self.ttl_s
            return True

    def release(self, key: str) -> None:
        """Forget ``key`` (its handling failed: the sender's retry must get through)."""
        with self._lock:
            self._seen.pop(key, None)


# ------------------------------------------------------------------ verification
def _secret(value: SecretStr | None, what: str) -> bytes:
    if value is None or not value.get_secret_value():
        raise Refused(403, f"no secret is configured for {what} notifications")
    return value.get_secret_value().encode()


def verify_mlflow(
    headers: Mapping[str, str], body: bytes, secret: SecretStr | None, tolerance_s: float
) -> str:
    """Check an MLflow 3 webhook's signature and timestamp; returns its delivery id.

    ``headers``: lower-case names (what :meth:`Receiver.handle` passes)."""
    key = _secret(secret, "MLflow")
    signature = headers.get("x-mlflow-signature", "")
    delivery = headers.get("x-mlflow-delivery-id", "")
    stamp = headers.get("x-mlflow-timestamp", "")
    if not signature or not delivery or not stamp:
        raise Refused(401, "unsigned: X-MLflow-Signature, -Delivery-Id and -Timestamp are required")
    version, _, sent = signature.partition(",")
    signed = f"{delivery}.{stamp}.".encode() + body
    want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    if version != "v1" or not hmac.compare_digest(sent, want):
        raise Refused(403, "bad signature")
    try:
        age = abs(time.time() - int(stamp))
    except ValueError:
        raise Refused(403, "bad timestamp") from None
    if age > tolerance_s:
        raise Refused(403, f"timestamp {age:.0f} s away from now (tolerance {tolerance_s:.0f} s)")
    return delivery


def verify_token(given: str, secret: SecretStr | None, what: str) -> None:
    """Compare a shared secret (Hub ``X-Webhook-Secret``, SeaweedFS bearer) in constant time."""
    key = _secret(secret, what)
    if not given:
        raise Refused(401, f"unsigned: no {what} secret in the request")
    if not hmac.compare_digest(given.encode(), key):
        raise Refused(403, f"bad {what} secret")


def push_to_lineages(n: Notification) -> dict[str, list[str]]:
    """Run ``mergeflow-push`` for every registered lineage source ``n`` concerns."""
    # pipeline extra, loaded on use
    from mergeflow.flows.push import push_flow
    from mergeflow.lineage import list_lineages, load_lineage

    out: dict[str, list[str]] = {}
    for pointer in list_lineages():
        try:
            spec = load_lineage(str(pointer["name"]))
        except Exception as err:  # one broken lineage must not silence the others
            log.warning(f"lineage {pointer.get('name')}: cannot load its spec: {err}")
            continue
        for source in spec.sources:
            if n.concerns(source):
                out.setdefault(spec.name, []).extend(push_flow(spec.name, source, via=n.via))
    return out


# ------------------------------------------------------------------------ server
class Receiver:
    """The HTTP endpoints (see the module docstring); ``dispatch`` turns a notification into events."""

    def __init__(self, settings: ReceiverSettings, dispatch: Dispatch = push_to_lineages) -> None:
        self.settings = settings
        self.dispatch = dispatch
        self.deliveries = ReplayGuard(2 * settings.tolerance_s)
        self.bodies = ReplayGuard(settings.replay_ttl_s)
        self.history: deque[tuple[str, int, str]] = deque(maxlen=200)
        """The last answers: (route, status, status word or refusal reason)."""
        self._server: ThreadingHTTPServer | None = None

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """One request -> (status, JSON answer). Never raises. Header names in any case."""
        headers = {k.lower(): v for k, v in headers.items()}
        route = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and route == "/health":
            return 200, {"status": "ok", "answered": len(self.history)}
        routes = {"/webhooks/mlflow", "/webhooks/hub", "/webhooks/seaweedfs"}
        if route not in routes:
            return self._refuse(route, Refused(404, "no such endpoint"))
        if method != "POST":
            return self._refuse(route, Refused(405, "use POST"))
        claimed: tuple[ReplayGuard, str] | None = None
        try:
            if len(body) > MAX_BODY:
                raise Refused(413, "body too large")
            notes, claimed = self._verify(route, headers, body)
            emitted: dict[str, list[str]] = {}
            for n in notes:
                for lineage, ids in self.dispatch(n).items():
                    emitted.setdefault(lineage, []).extend(ids)
        except Refused as refused:
            return self._refuse(route, refused)
        except Exception as err:  # the sender retries: let the retry through the replay guard
            if claimed is not None:
                claimed[0].release(claimed[1])
            log.exception(f"{route}: failed to handle a verified notification")
            self.history.append((route, 500, str(err)[:200]))
            return 500, {"status": "error", "reason": str(err)[:500]}
        status = "accepted" if notes else "ignored"
        log.info(f"{route}: {status} {[n.subject for n in notes]}, emitted {emitted}")
        self.history.append((route, 200, status))
        return 200, {"status": status, "subjects": [n.subject for n in notes], "emitted": emitted}

    def _verify(
        self, route: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[list[Notification], tuple[ReplayGuard, str]]:
        s = self.settings
        if route == "/webhooks/mlflow":
            delivery = verify_mlflow(headers, body, s.mlflow_secret, s.tolerance_s)
            guard, key = self.deliveries, f"mlflow:{delivery}"
        elif route == "/webhooks/hub":
            verify_token(headers.get("x-webhook-secret", ""), s.hub_secret, "Hub")
            guard, key = self.bodies, f"hub:{hashlib.sha256(body).hexdigest()}"
        else:
            bearer = headers.get("authorization", "")
            given = bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else ""
            verify_token(given, s.seaweedfs_token, "SeaweedFS")
            guard, key = self.bodies, f"seaweedfs:{hashlib.sha256(body).hexdigest()}"
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Refused(400, "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise Refused(400, "the body is not a JSON object")
        parse = {
            "/webhooks/mlflow": mlflow_notification,
            "/webhooks/hub": hub_notification,
            "/webhooks/seaweedfs": seaweedfs_notification,
        }[route]
        note = parse(payload)
        if not guard.claim(key):
            raise Refused(409, "replay of a request already handled")
        return ([note] if note is not None else []), (guard, key)

    def _refuse(self, route: str, refused: Refused) -> tuple[int, dict[str, Any]]:
        log.warning(f"refused {route}: {refused.status} {refused.reason}")
        self.history.append((route, refused.status, refused.reason))
        return refused.status, {"status": "refused", "reason": refused.reason}

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "receiver not started"
        return f"http://{self.settings.host}:{self._server.server_port}"

    def start(self) -> Receiver:
        """Listen on ``settings.host:port`` (0: any free port) in a daemon thread."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(size, MAX_BODY + 1)) if size else b""
                headers = dict(self.headers.items())
                status, doc = receiver.handle(self.command, self.path, headers, body)
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if size > MAX_BODY:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

        self._server = ThreadingHTTPServer((self.settings.host, self.settings.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, name="mergeflow-receiver", daemon=True
        ).start()
        log.info(f"receiver listening on {self.url}")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def poll_sqs(
    queue_url: str,
    dispatch: Dispatch = push_to_lineages,
    *,
    stop: threading.Event | None = None,
    client: Any = None,
    wait_s: int = 10,
) -> None:
    """Read S3 event notifications from an SQS queue until ``stop`` is set.

    Each message's objects are dispatched, then the message is deleted; a message whose
    handling fails stays in the queue (SQS redelivers it after its visibility timeout), and
    a message id seen before is deleted without dispatching it again.
    """
    import boto3

    sqs = client or boto3.client("sqs")
    seen = ReplayGuard(86400.0)
    stop = stop or threading.Event()
    while not stop.is_set():
        reply = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s
        )
        for m in reply.get("Messages", []):
            try:
                if seen.claim(m["MessageId"]):
                    for n in s3_notifications(json.loads(m["Body"])):
                        dispatch(n)
            except Exception:
                seen.release(m["MessageId"])
                log.exception(f"SQS message {m.get('MessageId')}: left in the queue")
                continue
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
