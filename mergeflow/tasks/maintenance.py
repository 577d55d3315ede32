"""Maintenance tasks: find a registered version's fold, and what storage versions still use."""

from __future__ import annotations

from prefect import task

from mergeflow.errors import ConfigError
from mergeflow.lineage import LineageSpec
from mergeflow.storage import states
from mergeflow.storage.registry import VersionRecord
from mergeflow.tasks import layout
from mergeflow.tasks.lineage import registry
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import FoldOutput, ModelOutput


@task(name="registered-versions", **io_task)
def registered_versions(spec: LineageSpec) -> list[VersionRecord]:
    """Every version of the lineage's registered model, by step."""
    return registry().versions(spec.registered_model)


@task(name="version-fold", **io_task)
def version_fold(spec: LineageSpec, version: str) -> tuple[FoldOutput, ModelOutput]:
    """The fold and merged weights a registered version points at (to score them again)."""
    v = next(
        (v for v in registry().versions(spec.registered_model) if v.version == str(version)), None
    )
    if v is None or not v.model_uri:
        raise ConfigError(f"{spec.registered_model} has no version {version} with merged weights")
    info = states.read_manifest(layout.store(v.state_uri)).info
    fold = FoldOutput(
        label="reevaluate",
        params=dict(info.params),
        prefix=layout.prefix_of(v.state_uri),
        state_uri=v.state_uri,
        step=info.step,
        folded=tuple(c.id for c in info.checkpoints),
        seconds=0.0,
        peak_rss_mb=0.0,
    )
    return fold, ModelOutput(model_uri=v.model_uri, seconds=0.0)


@task(name="referenced-prefixes", **io_task)
def referenced_prefixes(spec: LineageSpec, versions: list[VersionRecord]) -> set[str]:
    """Step prefixes that a registered version uses, directly or through a state's manifest
    (its own state and every candidate state it kept)."""
    steps = f"{spec.store}/steps/"
    keep: set[str] = set()

    def add(uri: str | None) -> None:
        if uri and uri.startswith(steps):
            keep.add(steps + uri[len(steps) :].split("/", 1)[0])

    for v in versions:
        add(v.model_uri)
        for state_uri in {v.state_uri, *(c.state_uri for c in v.candidates)} - {""}:
            add(state_uri)
            try:
                m = states.read_manifest(layout.store(state_uri))
            except Exception:
                continue
            add(m.tensors)
            for uri in m.heads.values():
                add(uri)
    return keep


@task(name="step-prefixes", **io_task)
def step_prefixes(spec: LineageSpec) -> list[str]:
    """Every ``<store>/steps/<step>`` prefix that holds objects."""
    root = layout.store(spec.store)
    found = {o.relpath.split("/")[1] for o in root.list("steps") if o.relpath.count("/") >= 2}
    return sorted(f"{spec.store}/steps/{name}" for name in found)
