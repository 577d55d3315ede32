"""Webhook requests as the registries send them, and a recording dispatch, for receiver tests."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import SecretStr

from mergeflow.services.notifications import Notification
from mergeflow.services.receiver import Receiver, ReceiverSettings

MLFLOW_SECRET = "mlflow-shared-secret"
HUB_SECRET = "hub-shared-secret"
TOKEN = "seaweedfs-token"


def mlflow_request(
    payload: dict[str, Any], secret: str = MLFLOW_SECRET, **kw: Any
) -> tuple[dict[str, str], bytes]:
    """Headers and body exactly as MLflow 3 sends them (its own signing function)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps(payload)
    delivery = kw.get("delivery", str(uuid.uuid4()))
    stamp = str(kw.get("timestamp", int(time.time())))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp, body),
    }
    return headers, body.encode()


def version_created(name: str, version: str = "1") -> dict[str, Any]:
    return {
        "entity": "model_version",
        "action": "created",
        "timestamp": "2025-01-01T00:00:00+00:00",
        "data": {
            "name": name,
            "version": version,
            "source": "models:/m-1",
            "run_id": "r",
            "tags": {},
        },
    }


def hub_payload(repo: str, sha: str, kind: str = "model") -> dict[str, Any]:
    """The documented Hub webhook payload (version 3) for a push to ``main``."""
    return {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {
            "type": kind,
            "name": repo,
            "id": "6360bbf6b7d6ea1e5b87c3cd",
            "private": False,
            "url": {
                "web": f"https://huggingface.co/{repo}",
                "api": f"https://huggingface.co/api/models/{repo}",
            },
            "headSha": sha,
            "owner": {"id": "6360bbf6b7d6ea1e5b87c3cc"},
        },
        "webhook": {"id": "6390e855e30d9209411de93b", "version": 3},
        "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": sha}],
    }


class Recorder:
    """Stands in for the Prefect side in unit tests: records what would be dispatched."""

    def __init__(self, fail: int = 0) -> None:
        self.seen: list[Notification] = []
        self.fail = fail

    def __call__(self, n: Notification) -> dict[str, list[str]]:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("Prefect is down")
        self.seen.append(n)
        return {"lin": [n.subject]}


def make_receiver(dispatch: Recorder, **kw: Any) -> Receiver:
    values: dict[str, Any] = {
        "mlflow_secret": SecretStr(MLFLOW_SECRET),
        "hub_secret": SecretStr(HUB_SECRET),
        "seaweedfs_token": SecretStr(TOKEN),
        **kw,
    }
    return Receiver(ReceiverSettings(**values), dispatch=dispatch)
