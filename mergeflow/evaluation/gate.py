"""The gate and the choice among candidate folds. Pure functions on **validation** scores.

``scores`` are one model's per-task scores over the tasks scored at its step (the tasks
whose checkpoints are folded, plus headless ones); ACC is their mean. ``champion_scores``
are the current champion's validation scores over its own tasks (``None``: no champion
yet). ``own_scores`` are each checkpoint's own validation score on its tasks, a_i(θ_i)
(the checkpoint alone), for the plasticity check. Reported numbers (MLflow, benchmarks)
come from the test split, which neither the gate nor the selection ever reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from mergeflow.evaluation.continual import forgetting, normalized
from mergeflow.evaluation.spec import GateSpec

EPS = 1e-9
"""Slack on every comparison, so a value equal to its threshold up to rounding passes."""


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
    own_scores: Mapping[str, float] | None = None,
) -> GateDecision:
    """Apply ``gate`` to a candidate's validation ``scores`` (see :class:`GateSpec`).

    Every failing check adds one reason, which names the task(s), the two numbers compared
    and the threshold; accepted iff there is none. For a higher-is-better suite
    (lower-is-better: "above" for "below", "rose" for "fell", "maximum"/"ceiling"):

    - ``no task scores to gate on`` (empty ``scores``);
    - ``task T scored nan, not a finite number``;
    - ``ACC a over N tasks is below the minimum m``;
    - ``task T fell d from the champion's c to s, more than max_forgetting x``;
    - ``ACC over the champion's tasks (T1, T2) fell d from the champion's c to a, more than
      max_drop x``;
    - ``new task T keeps r of its checkpoint's score (s vs its own o), below min_retention x``;
    - ``task T scored s, below its floor f``.
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
    below, fell = ("below", "fell") if higher_is_better else ("above", "rose")
    if gate.min_acc is not None and sign * (acc - gate.min_acc) < -EPS:
        word = "below the minimum" if higher_is_better else "above the maximum"
        reasons.append(f"ACC {acc:.4f} over {len(scores)} tasks is {word} {gate.min_acc:.4f}")
    champion = dict(champion_scores or {})
    lost = forgetting(scores, champion, higher_is_better=higher_is_better)
    if gate.max_forgetting is not None:
        for name, d in lost.items():
            if d > gate.max_forgetting + EPS:
                reasons.append(
                    f"task {name} {fell} {d:.4f} from the champion's {champion[name]:.4f} to "
                    f"{scores[name]:.4f}, more than max_forgetting {gate.max_forgetting:.4f}"
                )
    if gate.max_drop is not None and lost:
        old = list(lost)
        now = sum(scores[n] for n in old) / len(old)
        then = sum(champion[n] for n in old) / len(old)
        drop = sign * (then - now)
        if drop > gate.max_drop + EPS:
            reasons.append(
                f"ACC over the champion's tasks ({', '.join(old)}) {fell} {drop:.4f} from the "
                f"champion's {then:.4f} to {now:.4f}, more than max_drop {gate.max_drop:.4f}"
            )
    if gate.min_retention is not None and own_scores:
        new = {n: v for n, v in scores.items() if n not in champion}
        kept = normalized(new, own_scores, higher_is_better=higher_is_better)
        for name, r in kept.items():
            if r < gate.min_retention - EPS:
                reasons.append(
                    f"new task {name} keeps {r:.4f} of its checkpoint's score ({scores[name]:.4f} "
                    f"vs its own {own_scores[name]:.4f}), below min_retention {gate.min_retention:.4f}"
                )
    for name, floor in gate.task_floors.items():
        if name in scores and sign * (scores[name] - floor) < -EPS:
            word = f"{below} its floor" if higher_is_better else "above its ceiling"
            reasons.append(f"task {name} scored {scores[name]:.4f}, {word} {floor:.4f}")
    return GateDecision(
        accepted=not reasons, reasons=reasons, acc=acc, champion_acc=_mean(champion)
    )


def select_candidate(
    candidates_scores: Sequence[Mapping[str, float]],
    gate: GateSpec,
    champion_scores: Mapping[str, float] | None = None,
    *,
    higher_is_better: bool = True,
    own_scores: Mapping[str, float] | None = None,
) -> int | None:
    """Index of the best candidate that passes ``gate`` by validation ACC; ``None`` if none passes.

    Ties go to the first listed candidate.
    """
    best: int | None = None
    best_acc = 0.0
    for i, scores in enumerate(candidates_scores):
        d = decide(
            scores,
            champion_scores,
            gate,
            higher_is_better=higher_is_better,
            own_scores=own_scores,
        )
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
    heads: dict[str, int] = {}
    """Method -> the candidate whose state continues that method's chain (:func:`chain_heads`)."""


def choose(
    candidates_scores: Sequence[Mapping[str, float]],
    gate: GateSpec,
    champion_scores: Mapping[str, float] | None = None,
    *,
    higher_is_better: bool = True,
    own_scores: Mapping[str, float] | None = None,
) -> GateChoice:
    """The candidate to register: :func:`select_candidate`'s pick, accepted; when none passes,
    the best by validation ACC (first on ties), rejected with the reasons it failed."""
    if not candidates_scores:
        raise ValueError("choose needs at least one candidate")
    best = select_candidate(
        candidates_scores,
        gate,
        champion_scores,
        higher_is_better=higher_is_better,
        own_scores=own_scores,
    )
    if best is not None:
        return GateChoice(index=best, accepted=True, reasons=[])
    decisions = [
        decide(c, champion_scores, gate, higher_is_better=higher_is_better, own_scores=own_scores)
        for c in candidates_scores
    ]
    worst = float("-inf") if higher_is_better else float("inf")
    accs = [d.acc if d.acc is not None else worst for d in decisions]
    i = max(range(len(accs)), key=lambda j: (accs[j] if higher_is_better else -accs[j], -j))
    return GateChoice(index=i, accepted=False, reasons=list(decisions[i].reasons))


def chain_heads(
    candidates_scores: Sequence[Mapping[str, float]],
    methods: Sequence[str],
    gate: GateSpec,
    champion_scores: Mapping[str, float] | None = None,
    *,
    higher_is_better: bool = True,
    own_scores: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Per method, the index of the candidate whose state continues that method's chain:
    :func:`choose` among that method's candidates, so the overall choice heads its own."""
    heads: dict[str, int] = {}
    for m in dict.fromkeys(methods):
        idx = [i for i, x in enumerate(methods) if x == m]
        pick = choose(
            [candidates_scores[i] for i in idx],
            gate,
            champion_scores,
            higher_is_better=higher_is_better,
            own_scores=own_scores,
        )
        heads[m] = idx[pick.index]
    return heads
