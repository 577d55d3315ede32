"""The ``mergeflow.checkpoint.published`` event and the trigger that turns it into a fold run.

Event shape (what ``watch`` emits, what the fold deployment's trigger matches)::

    event:    mergeflow.checkpoint.published
    resource: prefect.resource.id    mergeflow.checkpoint.<sha256 hex of the digest>
              prefect.resource.name  <checkpoint id>
              mergeflow.lineage      <lineage name>
              mergeflow.checkpoint.id / .uri / .digest / .source
    related:  prefect.resource.id    mergeflow.lineage.<lineage name>   (role: lineage)
    payload:  {"published_at": ISO time or null}

The trigger passes ``lineage``, ``checkpoint_id``, ``checkpoint_uri`` and
``checkpoint_digest`` from the resource labels to ``mergeflow-fold``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from prefect.events import DeploymentEventTrigger, emit_event

from mergeflow.tasks.values import CheckpointRef

EVENT = "mergeflow.checkpoint.published"
RESOURCE_PREFIX = "mergeflow.checkpoint."
FOLD_PARAMETERS: dict[str, str] = {
    "lineage": "{{ event.resource['mergeflow.lineage'] }}",
    "checkpoint_id": "{{ event.resource['mergeflow.checkpoint.id'] }}",
    "checkpoint_uri": "{{ event.resource['mergeflow.checkpoint.uri'] }}",
    "checkpoint_digest": "{{ event.resource['mergeflow.checkpoint.digest'] }}",
}


def resource_id(ck: CheckpointRef) -> str:
    """``mergeflow.checkpoint.<hex>``: the digest's hex (or a hash of the URI without one)."""
    digest = (
        ck.digest.split(":", 1)[-1] if ck.digest else hashlib.sha256(ck.uri.encode()).hexdigest()
    )
    return RESOURCE_PREFIX + digest


def event_resources(lineage: str, ck: CheckpointRef) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The event's resource and related resources (see the module docstring)."""
    resource = {
        "prefect.resource.id": resource_id(ck),
        "prefect.resource.name": ck.id,
        "mergeflow.lineage": lineage,
        "mergeflow.checkpoint.id": ck.id,
        "mergeflow.checkpoint.uri": ck.uri,
        "mergeflow.checkpoint.digest": ck.digest,
        "mergeflow.checkpoint.source": ck.source or "",
    }
    related = [
        {
            "prefect.resource.id": f"mergeflow.lineage.{lineage}",
            "prefect.resource.role": "lineage",
            "prefect.resource.name": lineage,
        }
    ]
    return resource, related


def emit_published(lineage: str, ck: CheckpointRef) -> Any:
    """Emit one ``mergeflow.checkpoint.published`` event; returns the Event (None if events are off)."""

    resource, related = event_resources(lineage, ck)
    payload = {"published_at": ck.published_at.isoformat() if ck.published_at else None}
    return emit_event(event=EVENT, resource=resource, related=related, payload=payload)


def fold_trigger(lineage: str | None = None, exclude: Sequence[str] = ()) -> Any:
    """The ``DeploymentEventTrigger`` of a fold deployment: one lineage's, or every lineage's
    but those in ``exclude`` (which have their own fold deployment).

    Exclusion uses the related lineage resource: one negated ``match_related`` spec per
    excluded lineage, all of which must match (Prefect ANDs a list of them).
    """

    match: dict[str, str] = {"prefect.resource.id": RESOURCE_PREFIX + "*"}
    if lineage:
        match["mergeflow.lineage"] = lineage
    related: list[dict[str, str]] = [
        {"prefect.resource.role": "lineage", "prefect.resource.id": f"!mergeflow.lineage.{name}"}
        for name in sorted(set(exclude))
    ]
    return DeploymentEventTrigger(
        name=f"mergeflow fold on publish{f' ({lineage})' if lineage else ''}",
        expect={EVENT},
        match=match,
        match_related=related,
        parameters=dict(FOLD_PARAMETERS),
    )
