"""Text tables the CLI prints: the version chain of a lineage, the demo's live table.

Import it where it is used (it loads the MLflow registry package), never at the top of
:mod:`mergeflow.cli.main`, which `mergeflow merge` runs on the light install.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mergeflow.storage.registry import VersionRecord
from mergeflow.storage.registry.tags import TEST_AVG, TEST_BWT, TEST_PREFIX

TEST_NORM_AVG = TEST_PREFIX + "norm_avg"
"""Normalized ACC (the fold flow's ``test/norm_avg``)."""

__all__ = ["LiveTable", "format_candidates", "format_chain"]


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
                (v.checkpoint_id if len(v.checkpoint_id) <= 32 else v.checkpoint_id[:31] + "…")
                + (f" (pool of {len(v.pool)})" if v.pool else ""),
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


def format_candidates(versions: Sequence[VersionRecord]) -> str:
    """Which candidate each fold that tried several registered, and how the others scored
    (val/avg; ``*`` marks the states the next fold continues); "" when none tried several."""
    lines = []
    for v in versions:
        if not v.candidates:
            continue
        won = next((c for c in v.candidates if v.state_uri and c.state_uri == v.state_uri), None)
        scores = []
        for c in v.candidates:
            avg = sum(c.validation.values()) / len(c.validation) if c.validation else None
            kept = "*" if c.state_uri else ""
            scores.append(f"{c.label}{kept} {f'{avg:.4f}' if avg is not None else '-'}")
        head = f"{won.label} ({won.method})" if won else v.method
        lines.append(f"version {v.version} ({v.checkpoint_id}): {head} won; {', '.join(scores)}")
    if not lines:
        return ""
    return "\ncandidates (val/avg; * = state kept for the next fold):\n" + "\n".join(lines) + "\n"


def _short(name: str) -> str:
    return name[:10]


class LiveTable:
    """Prints one row per new version: step, checkpoint, the version it built on, per-task test
    score, ACC, normalized ACC, BWT, status; a rejected version gets a second line with its
    reason and the version the champion stays on."""

    def __init__(self, tasks: list[str], say: Callable[[str], None]) -> None:
        self.tasks = tasks
        self.say = say
        self.shown: set[str] = set()
        self._waited: dict[str, int] = {}
        self.width = 24
        cols = "".join(f"{_short(t):>11}" for t in tasks)
        self.say(
            f"{'ver':>4} {'step':>4}  {'checkpoint':<{self.width}}{'on':>4}{cols}"
            f"{'ACC':>8}{'nACC':>8}{'BWT':>8}  status"
        )

    def update(self, versions: Sequence[VersionRecord]) -> None:
        """Print the versions not shown yet."""
        champion = None
        for v in versions:
            if v.status == "accepted":
                champion = v
            if v.version in self.shown:
                continue
            if v is versions[-1] and not v.aliases and self._waited.get(v.version, 0) < 5:
                # just registered: its aliases are being set, show it at a later poll
                self._waited[v.version] = self._waited.get(v.version, 0) + 1
                continue
            self.shown.add(v.version)
            m = v.metrics
            cells = "".join(
                f"{m[TEST_PREFIX + t]:>11.3f}" if TEST_PREFIX + t in m else f"{'':>11}"
                for t in self.tasks
            )
            avg = f"{m[TEST_AVG]:>8.3f}" if TEST_AVG in m else f"{'-':>8}"
            norm = f"{m[TEST_NORM_AVG]:>8.3f}" if TEST_NORM_AVG in m else f"{'-':>8}"
            bwt = f"{m[TEST_BWT]:>+8.3f}" if TEST_BWT in m else f"{'-':>8}"
            status = v.status + (f" [{', '.join(v.aliases)}]" if v.aliases else "")
            ck = v.checkpoint_id
            ck = ck if len(ck) <= self.width - 1 else ck[: self.width - 2] + "…"
            self.say(
                f"{v.version:>4} {v.step:>4}  {ck:<{self.width}}{v.parent_version or '-':>4}"
                f"{cells}{avg}{norm}{bwt}  {status}"
            )
            if v.status == "rejected":
                stays = (
                    f"champion stays on version {champion.version}, the next fold builds on it"
                    if champion is not None
                    else "no champion yet"
                )
                self.say(f"{'':>11}rejected: {v.reason or 'no reason recorded'}")
                self.say(f"{'':>11}{stays}")
