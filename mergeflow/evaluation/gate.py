"""The gate and the choice among candidate folds. Pure functions on **validation** scores.

``scores`` are one model's per-task scores over the tasks scored at its step (the tasks
whose checkpoints are folded, plus headless ones); ACC is their mean. ``champion_scores``
are the current champion's validation scores over its own tasks (``None``: no champion
yet). Reported numbers (MLflow, benchmarks) come from the test split, which neither the
gate nor the selection ever reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from mergeflow.evaluation.spec import GateSpec


class GateDecision(BaseModel):
    """Whether a fold passes the gate, why not, and the ACCs compared."""

    model_config = ConfigDict(frozen=True)

    accepted: bool
    reasons: list[str]
    acc: float | None
    champion_acc: float | None = None


def _mean(scores: Mapping[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


def decide(
    scores: Mapping[str, float],
    champion_scores: Mapping[str, float] | None,
    gate: GateSpec,
    *,
    higher_is_better: bool = True,
) -> GateDecision:
    """Apply ``gate`` to a candidate's validation ``scores`` (see :class:`GateSpec`).

    Every failing check adds one reason; accepted iff there is none. Reasons:

    - ``no task scores to gate on`` (empty ``scores``);
    - ``task T scored nan, not a finite number``;
    - ``ACC a is below the minimum m`` (lower-is-better: ``above the maximum``);
    - ``ACC a is d below the champion's ACC c, more than max_drop x``
      (lower-is-better: ``above``);
    - ``task T scored s, below its floor f`` (lower-is-better: ``above its ceiling``).
    """
    reasons: list[str] = []
    if not scores:
        return GateDecision(accepted=False, reasons=["no task scores to gate on"], acc=None)
    bad = [n for n, v in scores.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    for n in bad:
        reasons.append(f"task {n} scored {scores[n]}, not a finite number")
    if bad:
        return GateDecision(accepted=False, reasons=reasons, acc=None)
    acc = _mean(scores)
    assert acc is not None
    sign = 1.0 if higher_is_better else -1.0
    if gate.min_acc is not None and sign * (acc - gate.min_acc) < 0:
        word = "below the minimum" if higher_is_better else "above the maximum"
        reasons.append(f"ACC {acc:.4f} is {word} {gate.min_acc:.4f}")
    champ = _mean(champion_scores) if champion_scores else None
    if gate.max_drop is not None and champ is not None:
        drop = sign * (champ - acc)
        if drop > gate.max_drop:
            word = "below" if higher_is_better else "above"
            reasons.append(
                f"ACC {acc:.4f} is {drop:.4f} {word} the champion's ACC {champ:.4f}, more than max_drop {gate.max_drop:.4f}"
            )
    for name, floor in gate.task_floors.items():
        if name in scores and sign * (scores[name] - floor) < 0:
            word = "below its floor" if higher_is_better else "above its ceiling"
            reasons.append(f"task {name} scored {scores[name]:.4f}, {word} {floor:.4f}")
    return GateDecision(accepted=not reasons, reasons=reasons, acc=acc, champion_acc=champ)


def select_candidate(
    candidates_scores: Sequence[Mapping[str, float]],
    gate: GateSpec,
    champion_scores: Mapping[str, float] | None = None,
    *,
    higher_is_better: bool = True,
) -> int | None:
    """Index of the best candidate that passes ``gate`` by validation ACC; ``None`` if none passes.

    Ties go to the first listed candidate.
    """
    best: int | None = None
    best_acc = 0.0
    for i, scores in enumerate(candidates_scores):
        d = decide(scores, champion_scores, gate, higher_is_better=higher_is_better)
        if not d.accepted or d.acc is None:
            continue
        better = d.acc > best_acc if higher_is_better else d.acc < best_acc
        if best is None or better:
            best, best_acc = i, d.acc
    return best


class GateChoice(BaseModel):
    """The candidate a fold keeps: the best that passes, or else the best failing one and why."""

    model_config = ConfigDict(frozen=True)

    index: int
    accepted: bool
    reasons: list[str]


def choose(
    candidates_scores: Sequence[Mapping[str, float]],
    gate: GateSpec,
    champion_scores: Mapping[str, float] | None = None,
    *,
    higher_is_better: bool = True,
) -> GateChoice:
    """The candidate to register: :func:`select_candidate`'s pick, accepted; when none passes,
    the best by validation ACC (first on ties), rejected with the reasons it failed."""
    if not candidates_scores:
        raise ValueError("choose needs at least one candidate")
    best = select_candidate(
        candidates_scores, gate, champion_scores, higher_is_better=higher_is_better
    )
    if best is not None:
        return GateChoice(index=best, accepted=True, reasons=[])
    decisions = [
        decide(c, champion_scores, gate, higher_is_better=higher_is_better)
        for c in candidates_scores
    ]
    worst = float("-inf") if higher_is_better else float("inf")
    accs = [d.acc if d.acc is not None else worst for d in decisions]
    i = max(range(len(accs)), key=lambda j: (accs[j] if higher_is_better else -accs[j], -j))
    return GateChoice(index=i, accepted=False, reasons=list(decisions[i].reasons))
