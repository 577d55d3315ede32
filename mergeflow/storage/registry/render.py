"""A version for people: its markdown description, plot nodes and the artifact files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from mergeflow.storage.registry.plots import (
    PlotNode,
    plot_accuracy_heatmap,
    plot_accuracy_per_step,
    plot_lineage,
)
from mergeflow.storage.registry.records import FoldRecord, VersionRecord, finite_metrics
from mergeflow.storage.registry.tags import (
    CHAMPION_ALIAS,
    NEWEST_ALIAS,
    TEST_AVG,
    TEST_BWT,
    TEST_PREFIX,
)

__all__ = ["describe", "plot_node", "write_artifacts"]

_MAX_DESCRIPTION = 4900


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _metrics_order(metrics: Mapping[str, float]) -> list[str]:
    head = [k for k in (TEST_AVG, TEST_BWT) if k in metrics]
    tasks = sorted(k for k in metrics if k.startswith(TEST_PREFIX) and k not in head)
    rest = sorted(k for k in metrics if k not in head and k not in tasks)
    return head + tasks + rest


def describe(rec: FoldRecord) -> str:
    """The markdown description of a version (also the run note and ``description.md``)."""
    parent = f"version {rec.parent_version}" if rec.parent_version else "none (first fold)"
    params = ", ".join(f"{k}={v}" for k, v in sorted(rec.params.items())) or "defaults"
    lines = [
        f"**{rec.status.upper()}** · lineage `{rec.lineage}` · step {rec.step}",
        "",
        "| | |",
        "|---|---|",
        *_pool(rec),
        f"| checkpoint | `{rec.checkpoint_id}` |",
        f"| checkpoint URI | `{rec.checkpoint_uri}` |",
        f"| digest | `{rec.checkpoint_digest}` |",
        f"| parent | {parent} |",
        f"| method | `{rec.method}` ({params}) |",
        f"| base | `{rec.base_uri}` |",
        f"| weights | `{rec.model_uri or '-'}` |",
        f"| state | `{rec.state_uri or '-'}` |",
    ]
    if rec.replaces:
        lines.append(f"| replaces | version {rec.replaces} (replayed after a dropped checkpoint) |")
    if rec.reason:
        lines.append(f"| reason | {rec.reason.replace('|', '/').replace(chr(10), ' ')[:600]} |")
    lines += _candidates(rec)
    metrics = finite_metrics(rec.metrics)
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        keys = _metrics_order(metrics)
        lines += [f"| {k} | {_fmt(metrics[k])} |" for k in keys[:40]]
        if len(keys) > 40:
            lines.append(f"| … | {len(keys) - 40} more in the run |")
    text = "\n".join(lines)
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 1] + "…"


def _pool(rec: FoldRecord) -> list[str]:
    """The pool row of a pool merge: how many checkpoints, which ones (the newest is the checkpoint)."""
    if not rec.pool:
        return []
    ids = ", ".join(f"`{m.id}`" for m in rec.pool[:40])
    more = f", … {len(rec.pool) - 40} more" if len(rec.pool) > 40 else ""
    return [f"| pool | {rec.method} merge of {len(rec.pool)} checkpoint(s): {ids}{more} |"]


def _candidates(rec: FoldRecord) -> list[str]:
    """The candidates table (the registered one in bold), when the fold tried several."""
    if not rec.candidates:
        return []
    lines = ["", "| candidate | method | val/avg | state |", "|---|---|---|---|"]
    for c in rec.candidates:
        won = bool(rec.state_uri) and c.state_uri == rec.state_uri
        params = ", ".join(f"{k}={v}" for k, v in sorted(c.params.items())) or "defaults"
        avg = sum(c.validation.values()) / len(c.validation) if c.validation else None
        lines.append(
            f"| {f'**{c.label}** (registered)' if won else c.label} | `{c.method}` ({params}) "
            f"| {_fmt(avg) if avg is not None else '-'} | `{c.state_uri or 'discarded'}` |"
        )
    return lines


def plot_node(v: VersionRecord) -> PlotNode:
    """A registered version as the pictures need it."""
    return PlotNode(
        version=v.version,
        step=v.step,
        status=v.status,
        checkpoint_id=v.checkpoint_id,
        parent_version=v.parent_version,
        test_avg=v.metrics.get(TEST_AVG),
        aliases=tuple(v.aliases),
    )


def write_artifacts(
    folder: Path, rec: FoldRecord, existing: list[VersionRecord], version: str
) -> None:
    """plots/*.png, description.md and mergeflow.json for the fold that becomes ``version``."""
    moved = {NEWEST_ALIAS, CHAMPION_ALIAS} if rec.status == "accepted" else {NEWEST_ALIAS}
    nodes = [plot_node(v) for v in existing]
    nodes = [replace(n, aliases=tuple(a for a in n.aliases if a not in moved)) for n in nodes]
    nodes.append(
        PlotNode(
            version=version,
            step=rec.step,
            status=rec.status,
            checkpoint_id=rec.checkpoint_id,
            parent_version=rec.parent_version,
            test_avg=finite_metrics(rec.metrics).get(TEST_AVG),
            aliases=(NEWEST_ALIAS, CHAMPION_ALIAS) if rec.status == "accepted" else (NEWEST_ALIAS,),
        )
    )
    title = f"{rec.lineage}: "
    plot_accuracy_per_step(
        nodes,
        folder / "plots" / "accuracy_per_step.png",
        accuracy_matrix=rec.accuracy_matrix,
        task_names=rec.task_names,
        title=title + "accuracy per step",
    )
    plot_lineage(nodes, folder / "plots" / "lineage.png", title=title + "lineage")
    if rec.accuracy_matrix:
        plot_accuracy_heatmap(
            rec.accuracy_matrix,
            rec.task_names,
            folder / "plots" / "accuracy_heatmap.png",
            title=title + "accuracy a_i(θ̄_j)",
        )
    (folder / "description.md").write_text(describe(rec) + "\n", encoding="utf-8")
    (folder / "mergeflow.json").write_text(
        json.dumps({"version": version, **rec.model_dump(mode="json")}, indent=2, default=str),
        encoding="utf-8",
    )
