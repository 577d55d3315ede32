"""Registry notifications: what changed (:class:`Notification`) and which lineage sources it concerns.

Parsers for the payloads the receiver (:mod:`mergeflow.services.receiver`) accepts, verified
first there: MLflow 3 ``model_version.created``, Hugging Face Hub repo events, SeaweedFS filer
events, AWS S3 event notifications (through SQS). Pure: no IO.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

__all__ = [
    "Notification",
    "Refused",
    "hub_notification",
    "mlflow_notification",
    "s3_notifications",
    "seaweedfs_notification",
]


class Refused(Exception):
    """A request the receiver will not act on: ``status`` (4xx) and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Notification:
    """What a registry said changed, and which lineage sources that concerns."""

    via: str
    subject: str
    registered_model: str | None = None
    repo_id: str | None = None
    bucket: str | None = None
    key: str | None = None

    def concerns(self, source: str) -> bool:
        """Whether listing ``source`` may show something new after this notification."""
        if self.registered_model is not None:
            from mergeflow.storage.registry import parse_mlflow_uri

            if not source.startswith(("mlflow://", "models:/")):
                return False
            try:
                name, version, alias = parse_mlflow_uri(source)
            except Exception:
                return False
            return name == self.registered_model and version is None and alias is None
        if self.repo_id is not None:
            if not source.startswith("hf://"):
                return False
            repo = source[len("hf://") :].split("?", 1)[0].split("@", 1)[0]
            if not repo:  # hf://?base_model=...: a new fine-tune anywhere may be one
                return True
            return "/".join(repo.split("/")[:2]) == self.repo_id
        if self.bucket is not None and self.key is not None:
            head = f"s3://{self.bucket}"
            if source.rstrip("/") == head:
                return True
            prefix = source[len(head) + 1 :].rstrip("/") if source.startswith(head + "/") else None
            return prefix is not None and self.key.startswith(prefix + "/")
        return False


def mlflow_notification(payload: Mapping[str, Any]) -> Notification | None:
    """``model_version.created`` -> the registered model; other events -> None."""
    if (payload.get("entity"), payload.get("action")) != ("model_version", "created"):
        return None
    data = payload.get("data")
    if not isinstance(data, dict) or not data.get("name"):
        raise Refused(400, "model_version.created without data.name")
    name, version = str(data["name"]), str(data.get("version", ""))
    return Notification("mlflow", f"models:/{name}/{version}", registered_model=name)


def hub_notification(payload: Mapping[str, Any]) -> Notification | None:
    """A model repo created or updated -> its repo id; anything else -> None."""
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        raise Refused(400, "a Hub webhook payload has event and repo objects")
    if repo.get("type") != "model" or event.get("action") not in ("create", "update"):
        return None
    if not str(event.get("scope", "repo")).startswith("repo"):
        return None
    name = str(repo.get("name") or "")
    if "/" not in name:
        raise Refused(400, "repo.name must be org/name")
    return Notification("hub", f"hf://{name}@{repo.get('headSha', '')}", repo_id=name)


def seaweedfs_notification(payload: Mapping[str, Any]) -> Notification | None:
    """A file created or updated under ``/buckets/<bucket>/`` -> that object; else None."""
    path = str(payload.get("key") or "")
    if payload.get("event_type") not in ("create", "update", "rename"):
        return None
    entry = (payload.get("message") or {}).get("new_entry") or {}
    parts = path.lstrip("/").split("/", 2)
    if entry.get("is_directory") or len(parts) < 3 or parts[0] != "buckets":
        return None
    return Notification("seaweedfs", f"s3://{parts[1]}/{parts[2]}", bucket=parts[1], key=parts[2])


def s3_notifications(message: Mapping[str, Any]) -> list[Notification]:
    """AWS S3 event notifications (``Records``, directly or wrapped by SNS) -> objects created."""
    if message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
        message = json.loads(message["Message"])
    out = []
    for r in message.get("Records") or []:
        if r.get("eventSource") != "aws:s3" or not str(r.get("eventName", "")).startswith(
            "ObjectCreated:"
        ):
            continue
        bucket = r["s3"]["bucket"]["name"]
        key = unquote_plus(r["s3"]["object"]["key"])
        out.append(Notification("s3", f"s3://{bucket}/{key}", bucket=bucket, key=key))
    return out
