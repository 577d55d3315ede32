"""Continual-learning metrics exactly as the OPCM paper defines them, plus the heatmap.

Notation: step j (1-based) folds checkpoint c_j and yields θ̄_j; a_i(θ̄_j) is task i's score
on θ̄_j. Task i *enters* at the step s_i that folds its checkpoint (headless tasks, with
``checkpoint: null``, enter at the first step where they are scored).

- ACC_t = mean over tasks entered at steps ≤ t of a_i(θ̄_t).
- BWT_t = 1/(t−1) · Σ_{i<t} [a_i(θ̄_t) − a_i(θ̄_i)]: the mean, over tasks that entered
  before step t, of how much their score changed since their own step. With one task per
  checkpoint this is exactly the paper's formula; with several tasks per checkpoint it is
  the mean over those tasks. **BWT_1 is undefined** (no earlier task): :meth:`bwt` returns
  ``None`` and nothing should be logged for it.
- Scores are taken as given: for a lower-is-better metric (perplexity) a positive BWT means
  the old tasks got *worse*.
- Normalized score of task i: a_i(θ̄_t)/a_i(θ_i), where a_i(θ_i) is the score of task i's
  own checkpoint alone (its *own score*); lower-is-better metrics use a_i(θ_i)/a_i(θ̄_t), so
  1 always means "as good as the checkpoint alone" (:func:`normalized`).
- Forgetting of task i against the champion θ̄_c: a_i(θ̄_c) − a_i(θ̄_t), sign-flipped for
  lower-is-better metrics, so a positive value always means the task got worse
  (:func:`forgetting`).

:class:`AccuracyMatrix` is a small frozen, JSON-serialisable value: the pipeline keeps the
matrix of the last accepted version and ``append``s a candidate's scores to it, so a
rejected fold never enters the history.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from mergeflow.errors import StateError


class AccuracyMatrix(BaseModel):
    """a_i(θ̄_j): ``values[j-1][task]`` is task's score after step j (absent = not scored).

    ``steps``: the checkpoint id folded at each step. ``tasks``: task names in the order
    they entered; ``entered[task]``: the step they entered at.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    entered: dict[str, int] = {}
    values: tuple[dict[str, float], ...] = ()

    @property
    def t(self) -> int:
        """The number of steps recorded."""
        return len(self.steps)

    def append(self, checkpoint_id: str, scores: Mapping[str, float]) -> AccuracyMatrix:
        """A new matrix with one more step: ``scores`` of θ̄_t on every task scored so far.

        Tasks not seen before enter at this step, in ``scores``' order. Every task that
        entered earlier must be scored again (a hole would make ACC/BWT meaningless).
        """
        step = self.t + 1
        missing = [name for name in self.tasks if name not in scores]
        if missing:
            raise StateError(
                f"step {step} ({checkpoint_id}) has no score for tasks {missing} that entered earlier"
            )
        for name, v in scores.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise StateError(
                    f"step {step} ({checkpoint_id}): task {name!r} scored {v!r}, not a finite number"
                )
        new = [name for name in scores if name not in self.entered]
        return AccuracyMatrix(
            steps=(*self.steps, checkpoint_id),
            tasks=(*self.tasks, *new),
            entered={**self.entered, **{n: step for n in new}},
            values=(*self.values, {k: float(v) for k, v in scores.items()}),
        )

    def a(self, task: str, step: int) -> float:
        """a_task(θ̄_step), 1-based step."""
        return self.values[step - 1][task]

    def _check(self, t: int | None) -> int:
        t = self.t if t is None else t
        if not 1 <= t <= self.t:
            raise ValueError(f"step {t} is outside 1..{self.t}")
        return t

    def acc(self, t: int | None = None) -> float:
        """ACC_t (default: the last step)."""
        t = self._check(t)
        names = [n for n in self.tasks if self.entered[n] <= t]
        return sum(self.a(n, t) for n in names) / len(names)

    def bwt(self, t: int | None = None) -> float | None:
        """BWT_t (default: the last step); ``None`` when no task entered before step t."""
        t = self._check(t)
        names = [n for n in self.tasks if self.entered[n] < t]
        if not names:
            return None
        return sum(self.a(n, t) - self.a(n, self.entered[n]) for n in names) / len(names)

    def acc_curve(self) -> list[float]:
        """ACC_1 .. ACC_T."""
        return [self.acc(t) for t in range(1, self.t + 1)]


def matrix_from_rows(steps: Sequence[tuple[str, Mapping[str, float]]]) -> AccuracyMatrix:
    """Build a matrix from ``[(checkpoint_id, scores after that step), ...]``."""
    m = AccuracyMatrix()
    for cid, scores in steps:
        m = m.append(cid, scores)
    return m


def plot_accuracy_matrix(
    matrix: AccuracyMatrix,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    split: str = "test",
) -> bytes:
    """Draw a_i(θ̄_j) as a heatmap (rows: tasks, columns: steps) and return PNG bytes.

    Cells where a task was not scored yet are blank. ACC and BWT per step go in the
    column labels. When ``path`` is given the PNG is also written there.
    """
    # matplotlib: only for plots
    import matplotlib

    matplotlib.use("Agg", force=False)
    # matplotlib: only for plots
    import matplotlib.pyplot as plt

    grid = np.full((len(matrix.tasks), max(matrix.t, 1)), np.nan)
    for j, row in enumerate(matrix.values):
        for i, name in enumerate(matrix.tasks):
            if name in row:
                grid[i, j] = row[name]
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.9 * max(matrix.t, 1), 1.0 + 0.45 * max(len(matrix.tasks), 1)), dpi=100
    )
    finite = grid[np.isfinite(grid)]
    lo, hi = (
        (0.0, 1.0)
        if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        else (float(finite.min()), float(finite.max()))
    )
    im = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                v = grid[i, j]
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < (lo + hi) / 2 else "black",
                )
    labels = []
    for j in range(matrix.t):
        b = matrix.bwt(j + 1)
        labels.append(
            f"{j + 1}\n{matrix.steps[j][:12]}\nACC {matrix.acc(j + 1):.2f}"
            + (f"\nBWT {b:+.2f}" if b is not None else "")
        )
    ax.set_xticks(range(matrix.t), labels, fontsize=6)
    ax.set_yticks(range(len(matrix.tasks)), list(matrix.tasks), fontsize=7)
    ax.set_xlabel("step (checkpoint folded)", fontsize=8)
    ax.set_title(title or f"a_i(θ̄_j) on the {split} split", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def continual_metrics(matrix: AccuracyMatrix, split: str = "test") -> dict[str, float]:
    """MLflow-ready metrics for the last step: ``{split}/{task}``, ``{split}/avg``, ``{split}/bwt``.

    ``{split}/bwt`` is left out at step 1, where BWT is undefined.
    """
    t = matrix.t
    out = {f"{split}/{name}": matrix.a(name, t) for name in matrix.tasks}
    out[f"{split}/avg"] = matrix.acc(t)
    b = matrix.bwt(t)
    if b is not None:
        out[f"{split}/bwt"] = b
    return out


def normalized(
    scores: Mapping[str, float], own: Mapping[str, float], *, higher_is_better: bool = True
) -> dict[str, float]:
    """Normalized score per task that has an own score (see the module docstring).

    A task whose ratio is undefined (own score 0 for higher-is-better, a score of 0 for
    lower-is-better) is left out.
    """
    out: dict[str, float] = {}
    for name, v in scores.items():
        if name not in own:
            continue
        num, den = (v, own[name]) if higher_is_better else (own[name], v)
        if den > 0 and math.isfinite(num):
            out[name] = num / den
    return out


def forgetting(
    scores: Mapping[str, float], champion: Mapping[str, float], *, higher_is_better: bool = True
) -> dict[str, float]:
    """Per task the champion was scored on: how much worse the candidate does (> 0: worse)."""
    sign = 1.0 if higher_is_better else -1.0
    return {n: sign * (champion[n] - v) for n, v in scores.items() if n in champion}


def gate_metrics(
    split: str,
    scores: Mapping[str, float],
    own: Mapping[str, float],
    champion: Mapping[str, float] | None = None,
    *,
    higher_is_better: bool = True,
) -> dict[str, float]:
    """MLflow-ready ``{split}/norm/<task>``, ``{split}/norm_avg`` (mean over the tasks that
    have an own score) and, with a champion, ``{split}/forgetting/<task>`` and
    ``{split}/forgetting_avg`` (mean over the champion's tasks)."""
    out: dict[str, float] = {}
    norm = normalized(scores, own, higher_is_better=higher_is_better)
    out.update({f"{split}/norm/{n}": v for n, v in norm.items()})
    if norm:
        out[f"{split}/norm_avg"] = sum(norm.values()) / len(norm)
    if champion:
        f = forgetting(scores, champion, higher_is_better=higher_is_better)
        out.update({f"{split}/forgetting/{n}": v for n, v in f.items()})
        if f:
            out[f"{split}/forgetting_avg"] = sum(f.values()) / len(f)
    return out
