"""Text tables the CLI prints: the version chain of a lineage, the demo's live table.

Import it where it is used (it loads the MLflow registry package), never at the top of
:mod:`mergeflow.cli.main`, which `mergeflow merge` runs on the light install.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mergeflow.storage.registry import VersionRecord
from mergeflow.storage.registry.tags import TEST_AVG, TEST_BWT, TEST_PREFIX

__all__ = ["LiveTable", "format_chain"]


def format_chain(versions: Sequence[VersionRecord]) -> str:
    """A text table of the version chain for ``mergeflow lineage show``."""
    if not versions:
        return "(no versions)"
    header = [
        "version",
        "step",
        "status",
        "checkpoint",
        "parent",
        TEST_AVG,
        TEST_BWT,
        "aliases",
        "reason",
    ]
    rows = []
    for v in versions:
        avg, bwt = v.metrics.get(TEST_AVG), v.metrics.get(TEST_BWT)
        rows.append(
            [
                v.version,
                str(v.step),
                v.status,
                v.checkpoint_id if len(v.checkpoint_id) <= 32 else v.checkpoint_id[:31] + "…",
                v.parent_version or "-",
                f"{avg:.4f}" if avg is not None else "-",
                f"{bwt:+.4f}" if bwt is not None else "-",
                ",".join(v.aliases) or "-",
                (v.reason[:60] + ("…" if len(v.reason) > 60 else "")) if v.reason else "",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _short(name: str) -> str:
    return name[:10]


class LiveTable:
    """Prints one row per new version: step, checkpoint, per-task test score, ACC, BWT, status."""

    def __init__(self, tasks: list[str], say: Callable[[str], None]) -> None:
        self.tasks = tasks
        self.say = say
        self.shown: set[str] = set()
        cols = "".join(f"{_short(t):>11}" for t in tasks)
        self.say(f"{'ver':>4} {'step':>4}  {'checkpoint':<14}{cols}{'ACC':>8}{'BWT':>8}  status")

    def update(self, versions: Sequence[VersionRecord]) -> None:
        """Print the versions not shown yet."""
        for v in versions:
            if v.version in self.shown:
                continue
            self.shown.add(v.version)
            m = v.metrics
            cells = "".join(
                f"{m[TEST_PREFIX + t]:>11.3f}" if TEST_PREFIX + t in m else f"{'':>11}"
                for t in self.tasks
            )
            avg = f"{m[TEST_AVG]:>8.3f}" if TEST_AVG in m else f"{'-':>8}"
            bwt = f"{m[TEST_BWT]:>+8.3f}" if TEST_BWT in m else f"{'-':>8}"
            status = (
                v.status
                + (f" ({v.reason})" if v.reason else "")
                + (f" [{', '.join(v.aliases)}]" if v.aliases else "")
            )
            self.say(
                f"{v.version:>4} {v.step:>4}  {v.checkpoint_id:<14}{cells}{avg}{bwt}  {status}"
            )
