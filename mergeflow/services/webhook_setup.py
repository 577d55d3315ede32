"""Setting up push notifications: the MLflow webhook, the MLflow server's webhook settings, secrets.

Used by ``mergeflow up --receiver`` and ``mergeflow receive --register-mlflow-webhook``
(see :mod:`mergeflow.services.receiver`) and by the stack's MLflow server.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

__all__ = ["MLFLOW_WEBHOOK_NAME", "ensure_mlflow_webhook", "local_secret", "mlflow_webhook_env"]

MLFLOW_WEBHOOK_NAME = "mergeflow-receiver"


def ensure_mlflow_webhook(url: str, secret: str, tracking_uri: str | None = None) -> str:
    """Create (or point at ``url``) the MLflow webhook ``mergeflow-receiver`` for new versions.

    The MLflow server must allow the URL: plain ``http`` and private addresses need
    ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``
    in the server's environment (the embedded stack sets both). Returns the webhook id.
    """
    from mergeflow.storage.registry.connection import make_client, mlflow_errors

    client = make_client(tracking_uri)
    with mlflow_errors("registering the MLflow webhook"):
        token = None
        while True:
            page = client.list_webhooks(max_results=100, page_token=token)
            for w in page:
                if w.name == MLFLOW_WEBHOOK_NAME:
                    client.update_webhook(
                        w.webhook_id,
                        url=url,
                        events=["model_version.created"],
                        secret=secret,
                        status="ACTIVE",
                    )
                    return str(w.webhook_id)
            token = page.token
            if not token:
                break
        created = client.create_webhook(
            name=MLFLOW_WEBHOOK_NAME,
            url=url,
            events=["model_version.created"],
            secret=secret,
            description="mergeflow: fold new checkpoints when a model version is created",
        )
        return str(created.webhook_id)


def mlflow_webhook_env(mlflow_home: Path, host: str) -> dict[str, str]:
    """What an MLflow server of the stack needs to deliver webhooks to a receiver on ``host``.

    A persistent key to encrypt webhook secrets (``<mlflow_home>/webhook-secret.key``, made
    once; MLflow otherwise makes a new one per start and loses its secrets) and a 5 s webhook
    cache; on a loopback host, plain ``http`` and private addresses (the local receiver).
    Values already in the environment win.
    """
    key_file = mlflow_home / "webhook-secret.key"
    if not key_file.exists():
        mlflow_home.mkdir(parents=True, exist_ok=True)
        key_file.write_bytes(base64.urlsafe_b64encode(os.urandom(32)))
        key_file.chmod(0o600)
    env = {
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key_file.read_text().strip(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "5",
    }
    if host in ("127.0.0.1", "localhost", "::1"):
        env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] = "http,https"
        env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] = "true"
    return {k: os.environ.get(k, v) for k, v in env.items()}


def local_secret(path: Path) -> str:
    """A random secret kept in ``path`` (mode 0600), made on first use (for `up --receiver`)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()
