"""The model card (``README.md``) of a merged model, following the Hugging Face Hub's conventions.

YAML metadata first (between ``---`` lines): ``base_model`` (a Hub repo id, when known),
``base_model_relation: merge``, ``library_name`` (``transformers`` when the folder has an HF
config), ``license`` (the base's, when its card names one) and ``tags`` (``merge``,
``mergeflow`` and the method). Then the body: method and parameters; the folded checkpoints
in order with their URIs and digests; what was dropped or rejected and why; the evaluation
table; the MLflow version it came from. Pure: no IO (see :mod:`mergeflow.storage.publish`).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CardCheckpoint", "CardExclusion", "ModelCard", "front_matter", "render_card"]

_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


class CardCheckpoint(BaseModel):
    """One folded checkpoint, in fold order."""

    model_config = ConfigDict(frozen=True)

    step: int
    id: str
    digest: str
    uri: str = ""
    version: str = ""
    """The MLflow version that registered the fold ("" when inherited from another lineage)."""


class CardExclusion(BaseModel):
    """A checkpoint the lineage saw and did not keep: dropped, or rejected, and why."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: str
    reason: str
    uri: str = ""
    version: str = ""


class ModelCard(BaseModel):
    """Everything the card says (:func:`render_card` writes it)."""

    model_config = ConfigDict(frozen=True)

    registered_model: str
    version: str
    lineage: str
    aliases: tuple[str, ...] = ()
    base_uri: str
    base_model: str | None = None
    """The base's Hub repo id (``org/name``), when it is on the Hub or given."""
    license: str | None = None
    library_name: str | None = None
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    step: int
    scale: float
    checkpoints: tuple[CardCheckpoint, ...] = ()
    pool: bool = False
    """The version merged ``checkpoints`` at once with a pool method (not fold by fold)."""
    excluded: tuple[CardExclusion, ...] = ()
    metrics: dict[str, float] = Field(default_factory=dict)
    run_id: str | None = None
    model_id: str | None = None
    weights_uri: str = ""
    state_uri: str = ""


def front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a card (empty when there is none or it is not a mapping)."""
    m = _FRONT.match(text)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _metadata(card: ModelCard) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if card.base_model:
        meta["base_model"] = card.base_model
        meta["base_model_relation"] = "merge"
    if card.library_name:
        meta["library_name"] = card.library_name
    if card.license:
        meta["license"] = card.license
    meta["tags"] = list(dict.fromkeys(["merge", "mergeflow", card.method]))
    return meta


def _evaluation(metrics: dict[str, float]) -> list[str]:
    tasks = sorted(
        {k.split("/", 1)[1] for k in metrics if k.startswith(("test/", "val/"))} - {"avg", "bwt"}
    )
    if not tasks:
        return ["No evaluation suite scored this version."]

    def fmt(key: str) -> str:
        return f"{metrics[key]:.4f}" if key in metrics else "-"

    lines = ["| task | validation | test |", "|---|---|---|"]
    lines += [f"| {_cell(t)} | {fmt('val/' + t)} | {fmt('test/' + t)} |" for t in tasks]
    lines.append(f"| **mean (ACC)** | {fmt('val/avg')} | {fmt('test/avg')} |")
    if "test/bwt" in metrics:
        lines += ["", f"Backward transfer (BWT) on the test split: {metrics['test/bwt']:+.4f}."]
    return lines


def render_card(card: ModelCard) -> str:
    """The card's markdown, metadata first."""
    meta = yaml.safe_dump(_metadata(card), sort_keys=False, allow_unicode=True).strip()
    base = (
        f"[{card.base_model}](https://huggingface.co/{card.base_model})"
        if card.base_model
        else f"`{card.base_uri}`"
    )
    n = len(card.checkpoints)
    params = card.params or {}
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# {card.registered_model} (version {card.version})",
        "",
        f"A **merge** of {n} fine-tuned checkpoint{'s' if n != 1 else ''} of {base}, "
        + (
            f"merged at once as one pool with the pool merging method `{card.method}`"
            if card.pool
            else f"folded one at a time with the continual merging method `{card.method}`"
        )
        + f" by mergeflow (lineage `{card.lineage}`). The merged weights are θ₀ + scale·D, "
        + (
            "with D the pool's merged task vector."
            if card.pool
            else "with D the method's state after the last fold."
        ),
        "",
        "## Method",
        "",
        "| parameter | value |",
        "|---|---|",
        f"| method | `{card.method}` |",
        *[f"| {_cell(k)} | `{_cell(v)}` |" for k, v in sorted(params.items())],
        f"| folds (step) | {card.step} |",
        f"| scale | {card.scale:.6g} |",
        f"| base | `{_cell(card.base_uri)}` |",
        "",
        "## Folded checkpoints, in order",
        "",
    ]
    if card.checkpoints:
        lines += ["| step | checkpoint | URI | digest | MLflow version |", "|---|---|---|---|---|"]
        lines += [
            f"| {c.step} | `{_cell(c.id)}` | `{_cell(c.uri or '-')}` | `{_cell(c.digest)}` "
            f"| {c.version or 'inherited'} |"
            for c in card.checkpoints
        ]
    else:
        lines.append("None: this is the base model.")
    lines += ["", "## Dropped and rejected checkpoints", ""]
    if card.excluded:
        lines += [
            "What the lineage had dropped or rejected when this card was written:",
            "",
            "| checkpoint | status | reason | URI | MLflow version |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{_cell(e.id)}` | {e.status} | {_cell(e.reason or '-')} | `{_cell(e.uri or '-')}` "
            f"| {e.version or '-'} |"
            for e in card.excluded
        ]
    else:
        lines.append("None.")
    lines += ["", "## Evaluation", "", *_evaluation(card.metrics), "", "## Provenance", ""]
    aliases = f" (aliases: {', '.join(card.aliases)})" if card.aliases else ""
    lines += [
        f"- MLflow registered model `{card.registered_model}`, version {card.version}{aliases}: "
        f"`models:/{card.registered_model}/{card.version}`",
    ]
    if card.run_id:
        lines.append(f"- MLflow run `{card.run_id}`")
    if card.model_id:
        lines.append(f"- MLflow LoggedModel `{card.model_id}`")
    if card.weights_uri:
        lines.append(f"- weights exported from `{card.weights_uri}`")
    if card.state_uri:
        lines.append(f"- merge state (to continue folding) at `{card.state_uri}`")
    return "\n".join(lines) + "\n"
