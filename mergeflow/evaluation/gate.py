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
from typing import Any

from pydantic import BaseModel, ConfigDict

from mergeflow.evaluation.evaluators import Evaluator, Heads
from mergeflow.evaluation.spec import GateSpec, TaskSpec
from mergeflow.merging.io import TensorReader


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


class CandidateResult(BaseModel):
    """One candidate's validation scores, gate decision and (optionally) test scores."""

    model_config = ConfigDict(frozen=True)

    validation: dict[str, float]
    decision: GateDecision
    test: dict[str, float] | None = None


def evaluate_candidate(
    evaluator: Evaluator,
    model: TensorReader,
    heads: Heads,
    tasks: Sequence[TaskSpec],
    gate: GateSpec,
    champion_validation: Mapping[str, float] | None,
    *,
    higher_is_better: bool = True,
    with_test: bool = True,
) -> CandidateResult:
    """Score one candidate (the per-candidate call the pipeline maps over).

    Runs the validation split, applies the gate, and (``with_test``) scores the test split
    for reporting. Feed ``[r.validation for r in results]`` to :func:`select_candidate`.
    """
    val = evaluator.evaluate(model, heads, tasks, "validation")
    decision = decide(val, champion_validation, gate, higher_is_better=higher_is_better)
    test = evaluator.evaluate(model, heads, tasks, "test") if with_test else None
    return CandidateResult(validation=val, decision=decision, test=test)


def describe(decision: GateDecision) -> dict[str, Any]:
    """A small JSON-able summary (status + reasons) for tags and descriptions."""
    return {
        "status": "accepted" if decision.accepted else "rejected",
        "reasons": list(decision.reasons),
        "acc": decision.acc,
    }
