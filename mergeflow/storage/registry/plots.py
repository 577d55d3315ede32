"""PNG pictures of a lineage for the MLflow UI: accuracy per step, the version chain, a heatmap.

Drawn with matplotlib's object API (``Figure`` + Agg canvas, no ``pyplot``), so no global
state is touched and the functions are safe to call from worker threads. Every function
takes plain data (:class:`PlotNode` rows, lists of floats) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from mergeflow.storage.registry.tags import CHAMPION_ALIAS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_NODES = 30
"""The lineage picture shows at most this many (the newest) versions."""

_ACCEPTED = "#cfe3f7"
_REJECTED = "#e3e3e3"
_CHAMPION_EDGE = "#d4a017"


@dataclass(frozen=True)
class PlotNode:
    """One version as the pictures need it."""

    version: str
    step: int
    status: str
    checkpoint_id: str
    parent_version: str | None
    test_avg: float | None = None
    """The version's ``test/avg`` metric."""
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _figure(width: float, height: float) -> Figure:

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def scored(nodes: Sequence[PlotNode], status: str) -> list[PlotNode]:
    """The versions of ``status`` that have a score. Superseded and dropped versions are no
    longer in the history and are drawn by neither the accuracy line nor the rejected marks."""
    return [n for n in nodes if n.status == status and _finite(n.test_avg)]


def plot_accuracy_per_step(
    nodes: Sequence[PlotNode],
    out: Path,
    *,
    accuracy_matrix: Sequence[Sequence[float | None]] = (),
    task_names: Sequence[str] = (),
    title: str = "",
) -> Path:
    """Average accuracy of every version by step (accepted: line, rejected: grey x; superseded
    and dropped versions are left out).

    ``accuracy_matrix`` (rows tasks, columns steps 1..J of the accepted chain) adds one
    thin line per task. Missing values (``None``/NaN) are left out.
    """
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for i, row in enumerate(accuracy_matrix):
        xs = [j + 1 for j, v in enumerate(row) if _finite(v)]
        ys = [float(v) for v in row if _finite(v)]  # type: ignore[arg-type]
        if xs:
            label = task_names[i] if i < len(task_names) else f"task {i}"
            ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.6, label=label)
    acc, rej = scored(nodes, "accepted"), scored(nodes, "rejected")
    if acc:
        ax.plot(
            [n.step for n in acc],
            [float(n.test_avg or 0.0) for n in acc],
            color="black",
            linewidth=2.5,
            marker="o",
            label="average (accepted)",
        )
        for n in acc:
            ax.annotate(
                f"v{n.version}",
                (n.step, n.test_avg),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
            )
    if rej:
        ax.scatter(
            [n.step for n in rej],
            [float(n.test_avg or 0.0) for n in rej],
            color="grey",
            marker="x",
            s=60,
            label="average (rejected)",
            zorder=3,
        )
    if not (acc or rej or accuracy_matrix):
        ax.text(0.5, 0.5, "no scores yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step (checkpoints folded)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "accuracy per step")
    ax.grid(alpha=0.3)
    steps = sorted(
        {n.step for n in nodes} | {j + 1 for r in accuracy_matrix for j in range(len(r))}
    )
    if steps and len(steps) <= 40:
        ax.set_xticks(steps)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_lineage(nodes: Sequence[PlotNode], out: Path, *, title: str = "") -> Path:
    """The version chain: a box per version, an arrow parent -> child.

    Accepted versions sit on the top row, rejected ones (grey, dashed) below their column;
    the ``champion`` has a gold border. Only the newest :data:`MAX_NODES` are drawn.
    """

    shown = list(nodes)[-MAX_NODES:]
    hidden = len(nodes) - len(shown)
    n = max(len(shown), 1)
    fig = _figure(min(2.3 * n + 1.0, 70.0), 3.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    w, h = 1.7, 0.8
    pos: dict[str, tuple[float, float]] = {}
    for i, node in enumerate(shown):
        x, y = 2.2 * i, 0.0 if node.status == "accepted" else -1.25
        pos[node.version] = (x, y)
        accepted = node.status == "accepted"
        champion = CHAMPION_ALIAS in node.aliases
        box = FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.04",
            facecolor=_ACCEPTED if accepted else _REJECTED,
            edgecolor=_CHAMPION_EDGE if champion else ("#4a6fa5" if accepted else "#9a9a9a"),
            linewidth=3 if champion else 1.2,
            linestyle="-" if accepted else "--",
        )
        ax.add_patch(box)
        acc = f"acc {node.test_avg:.3f}" if _finite(node.test_avg) else "acc -"
        ckpt = (
            node.checkpoint_id if len(node.checkpoint_id) <= 20 else node.checkpoint_id[:19] + "…"
        )
        text = f"v{node.version} · step {node.step}\n{ckpt}\n{acc}"
        ax.text(
            x,
            y,
            text,
            ha="center",
            va="center",
            fontsize=7,
            color="black" if accepted else "#666666",
        )
        tags = [node.status if not accepted else "", *node.aliases]
        label = " ".join(t for t in tags if t)
        if label:
            ax.text(
                x,
                y + h / 2 + 0.12,
                label,
                ha="center",
                va="bottom",
                fontsize=7,
                color=_CHAMPION_EDGE if champion else "#555555",
                fontweight="bold",
            )
    for node in shown:
        if node.parent_version is None or node.parent_version not in pos:
            continue
        (x0, y0), (x1, y1) = pos[node.parent_version], pos[node.version]
        if y0 == y1:
            start, end = (x0 + w / 2, y0), (x1 - w / 2, y1)
        else:
            start, end = (x0 + w / 4, y0 - h / 2), (x1 - w / 4, y1 + h / 2)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=12,
                color="#9a9a9a" if y1 < 0 else "#333333",
                linewidth=1.2,
            )
        )
    if hidden:
        ax.text(-1.4, 0, f"… {hidden} earlier", ha="right", va="center", fontsize=8)
    if not shown:
        ax.text(0, 0, "no versions yet", ha="center", va="center")
    ax.set_xlim(-1.6 - (1.2 if hidden else 0), 2.2 * (n - 1) + 1.2)
    ax.set_ylim(-2.0, 0.9)
    ax.set_title(title or "lineage (parent → child; grey = rejected)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_accuracy_heatmap(
    accuracy_matrix: Sequence[Sequence[float | None]],
    task_names: Sequence[str],
    out: Path,
    *,
    title: str = "",
) -> Path:
    """Heatmap of a_i(θ̄_j): rows tasks i, columns steps j; blank where not scored."""

    rows = len(accuracy_matrix)
    cols = max((len(r) for r in accuracy_matrix), default=0)
    data = np.full((max(rows, 1), max(cols, 1)), np.nan)
    for i, row in enumerate(accuracy_matrix):
        for j, v in enumerate(row):
            if _finite(v):
                data[i, j] = float(v)  # type: ignore[arg-type]
    fig = _figure(
        min(1.0 + 0.7 * max(cols, 1), 30.0) + 2.0, min(1.0 + 0.45 * max(rows, 1), 30.0) + 1.0
    )
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(data)
    image = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="accuracy")
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                if not np.isnan(data[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{data[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if data[i, j] < 0.6 else "black",
                    )
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    names = [task_names[i] if i < len(task_names) else f"task {i}" for i in range(rows)]
    ax.set_yticks(range(rows), names)
    ax.set_xlabel("step j (merged model θ̄_j)")
    ax.set_ylabel("task i")
    ax.set_title(title or "accuracy a_i(θ̄_j)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
