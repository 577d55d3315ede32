"""Export a registered merged model as a Hugging Face folder with its card; publish it to the Hub.

``export_version("models:/NAME@ALIAS", out)`` (or ``models:/NAME/VERSION``,
``mlflow://models/...``) copies the version's weights folder (``mergeflow.model.uri``: the
base's config and tokenizer files, safetensors, ``mergeflow.json``), streaming, into ``out``
(written beside it and renamed at the end), writes the model card (``README.md``,
:mod:`mergeflow.storage.card`) and logs the same card to the version's MLflow run and
LoggedModel artifacts. ``publish_version`` exports to a temporary folder and uploads it to a
Hub model repo in one commit with ``huggingface_hub`` (``HF_TOKEN``, ``HF_ENDPOINT``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

from huggingface_hub import HfApi
from pydantic import BaseModel, ConfigDict

from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.storage import states
from mergeflow.storage.card import (
    CardCheckpoint,
    CardExclusion,
    ModelCard,
    front_matter,
    render_card,
)
from mergeflow.storage.hf_layout import CONFIG_FILE
from mergeflow.storage.hub.refs import HubRef, hub_errors, is_hub_uri, resolve_endpoint
from mergeflow.storage.registry import Registry, VersionRecord, parse_mlflow_uri
from mergeflow.storage.registry.tags import DROPPED
from mergeflow.storage.schemes import open_readable, open_store

__all__ = ["ExportResult", "PublishResult", "build_card", "export_version", "publish_version"]

CARD_FILE = "README.md"
_CHUNK = 64 * 2**20


class ExportResult(BaseModel):
    """Where a version was exported and the card written with it."""

    model_config = ConfigDict(frozen=True)

    path: Path
    registered_model: str
    version: str
    card: ModelCard


class PublishResult(BaseModel):
    """The Hub commit that published a version."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    version: str
    commit_url: str
    commit_oid: str


def pick_version(uri: str, versions: list[VersionRecord]) -> VersionRecord:
    """The version ``uri`` names (number, alias, ``latest``) among a registered model's."""
    name, number, alias = parse_mlflow_uri(uri)
    if not versions:
        raise ConfigError(f"{uri}: registered model {name!r} has no versions")
    if number == "latest" or alias == "latest":
        return max(versions, key=lambda v: int(v.version))
    for v in versions:
        if (number is not None and v.version == number) or (alias and alias in v.aliases):
            return v
    what = f"version {number}" if number else f"alias {alias!r}" if alias else "version or alias"
    raise ConfigError(f"{uri}: registered model {name!r} has no {what}")


def _base_card_facts(base_uri: str) -> tuple[str | None, str | None]:
    """(Hub repo id, license) of the base: the id from an ``hf://`` URI, the license from the
    base's own card (``README.md`` beside its weights) when it names one."""
    repo_id = HubRef.parse(base_uri).repo_id if is_hub_uri(base_uri) else None
    try:
        text = open_readable(base_uri).read_bytes(CARD_FILE).decode("utf-8", "replace")
    except (MergeflowError, OSError, FileNotFoundError, ValueError):
        return repo_id, None
    license_ = front_matter(text).get("license")
    return repo_id, str(license_) if license_ else None


def build_card(
    registered_model: str, v: VersionRecord, versions: list[VersionRecord], base_model: str | None
) -> ModelCard:
    """The card of version ``v`` from its tags, its state and the lineage's other versions."""
    info = states.read_manifest(open_store(v.state_uri)).info
    by_digest = {
        x.checkpoint_digest: x
        for x in sorted(versions, key=lambda x: int(x.version))
        if x.state_uri
    }
    folded = tuple(
        CardCheckpoint(
            step=c.step,
            id=c.id,
            digest=c.digest,
            uri=c.uri or (by_digest[c.digest].checkpoint_uri if c.digest in by_digest else ""),
            version=by_digest[c.digest].version if c.digest in by_digest else "",
        )
        for c in info.checkpoints
    )
    excluded = tuple(
        CardExclusion(
            id=x.checkpoint_id,
            status=x.status,
            reason=x.dropped_reason if x.status == DROPPED else x.reason,
            uri=x.checkpoint_uri,
            version=x.version,
        )
        for x in sorted(versions, key=lambda x: int(x.version))
        if x.status in (DROPPED, "rejected")
    )
    hub_id, license_ = _base_card_facts(info.base.uri)
    weights = open_readable(v.model_uri)
    config = json.loads(weights.read_bytes(CONFIG_FILE)) if weights.exists(CONFIG_FILE) else {}
    return ModelCard(
        registered_model=registered_model,
        version=v.version,
        lineage=v.lineage,
        aliases=tuple(v.aliases),
        base_uri=info.base.uri,
        base_model=base_model or hub_id,
        license=license_,
        library_name="transformers" if config.get("model_type") else None,
        method=info.method,
        params=dict(info.params),
        step=info.step,
        scale=info.scale,
        checkpoints=folded,
        pool=bool(v.pool),
        excluded=excluded,
        metrics=dict(v.metrics),
        run_id=v.run_id,
        model_id=v.model_id,
        weights_uri=v.model_uri,
        state_uri=v.state_uri,
    )


def _copy_folder(src_uri: str, dst: Path) -> None:
    """Copy every object under ``src_uri`` into ``dst``, 64 MiB at a time."""
    src = open_readable(src_uri)
    for obj in src.list(""):
        target = dst / obj.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        source = src.byte_source(obj.relpath)
        size = source.size()
        with open(target, "wb") as fh:
            for offset in range(0, size, _CHUNK):
                fh.write(source.read(offset, min(_CHUNK, size - offset)))


def _log_card(reg: Registry, v: VersionRecord, card_dir: Path) -> None:
    """The same card in the version's MLflow artifacts (run and LoggedModel)."""
    if v.run_id:
        reg.client.log_artifact(v.run_id, str(card_dir / CARD_FILE))
    if v.model_id:
        reg.client.log_model_artifacts(v.model_id, str(card_dir))


def export_version(
    uri: str,
    out: Path,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    tracking_uri: str | None = None,
) -> ExportResult:
    """Write version ``uri``'s merged model and card to the folder ``out`` (see the module doc).

    Raises :class:`ConfigError` for an unknown version or alias, a version without weights
    (rejected at validation, or not a mergeflow version) and an existing ``out`` without
    ``overwrite``; nothing is written then.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    name = parse_mlflow_uri(uri)[0]
    reg = Registry(tracking_uri)
    versions = reg.versions(name)
    v = pick_version(uri, versions)
    if not v.lineage:
        raise ConfigError(f"{uri}: version {v.version} was not registered by mergeflow")
    if not v.state_uri or not v.model_uri:
        why = v.reason or "no reason recorded"
        raise ConfigError(f"{uri}: version {v.version} has no merged weights ({v.status}: {why})")
    card = build_card(name, v, versions, base_model)
    text = render_card(card)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _copy_folder(v.model_uri, tmp)
        (tmp / CARD_FILE).write_text(text, encoding="utf-8")
        with tempfile.TemporaryDirectory(prefix="mergeflow-card-") as card_dir:
            (Path(card_dir) / CARD_FILE).write_text(text, encoding="utf-8")
            _log_card(reg, v, Path(card_dir))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(path=out, registered_model=name, version=v.version, card=card)


def publish_version(
    uri: str,
    target: str,
    *,
    private: bool | None = None,
    message: str | None = None,
    base_model: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    tracking_uri: str | None = None,
) -> PublishResult:
    """Export ``uri`` and upload it to the Hub repo ``target`` (``hf://org/repo``) in one commit.

    The repo is created if missing. Credentials come from ``token`` or ``HF_TOKEN``.
    """
    ref = HubRef.parse(target) if is_hub_uri(target) else None
    if ref is None or ref.subfolder or (ref.revision not in (None, "main")):
        raise ConfigError(f"publish to a Hub model repo as hf://org/repo, not {target!r}")
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=token)
    with tempfile.TemporaryDirectory(prefix="mergeflow-publish-") as tmp:
        exported = export_version(
            uri, Path(tmp) / "model", base_model=base_model, tracking_uri=tracking_uri
        )
        title = message or (
            f"mergeflow: {exported.registered_model} version {exported.version} "
            f"({exported.card.method}, {exported.card.step} folds)"
        )
        with hub_errors(target, ConfigError):
            api.create_repo(ref.repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=ref.repo_id,
                folder_path=exported.path,
                commit_message=title,
                commit_description=f"Exported from models:/{exported.registered_model}/{exported.version}",
            )
    return PublishResult(
        repo_id=ref.repo_id,
        version=exported.version,
        commit_url=str(info.commit_url),
        commit_oid=str(info.oid),
    )
