"""Calibration objectives: a differentiable loss of a merged model on each task's calibration split.

Data-informed merging methods (e.g. AdaMerging's learned coefficients) optimise a loss of
the merged model; this module supplies it as the merging side's
:class:`~mergeflow.merging.methods.base.Objective`. It reads only the ``calibration`` split
of each task (:meth:`~mergeflow.evaluation.spec.TaskSpec.calibration_uri`), never the
``validation`` split the gate reads nor the ``test`` split scores are reported on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.func import functional_call

from mergeflow.errors import ConfigError, MergeflowError, ServiceUnavailable
from mergeflow.evaluation.data import (
    ReadBytes,
    calibration_inputs,
    data_format,
    parse_arrays,
    read_local_bytes,
)
from mergeflow.evaluation.models import Heads, head_for, instantiate, load_weights, logits_of
from mergeflow.evaluation.spec import EvaluationSuite, TaskSpec

__all__ = ["CalibrationObjective", "LossKind", "build_objective"]

LossKind = Literal["auto", "cross_entropy", "entropy"]


@dataclass(frozen=True)
class _TaskData:
    """One task's calibration set, its head and its loss (resolved at build time)."""

    name: str
    uri: str
    head: Mapping[str, torch.Tensor]
    x: np.ndarray | None
    kwargs: Mapping[str, np.ndarray]
    labels: np.ndarray | None  # None: the entropy objective
    order: np.ndarray  # the row order batches walk through, cycled over epochs

    @property
    def loss(self) -> Literal["cross_entropy", "entropy"]:
        """Which loss this task uses."""
        return "entropy" if self.labels is None else "cross_entropy"


class CalibrationObjective:
    """The mean over tasks of each task's loss of the merged model on a calibration minibatch.

    Implements :class:`~mergeflow.merging.methods.base.Objective`: ``objective(tensors,
    step)`` with ``tensors`` the merged model's floating-point tensors by base name (they
    may require grad) returns the differentiable scalar

        L(θ, step) = (1/|T|) Σ_{t∈T} ℓ_t(θ; B_t(step))

    over the tasks ``T`` (:attr:`tasks`), where ``B_t(step)`` is task t's minibatch for
    the step and, with ``f_t(x)`` the logits of the merged model with task t's head,

    - ``ℓ_t = mean_{(x,y)∈B} CE(f_t(x), y)`` (cross-entropy) where the task's calibration
      data have labels;
    - ``ℓ_t = mean_{x∈B} H(softmax(f_t(x)))``, ``H(p) = −Σ_c p_c log p_c``, where they do
      not (or with ``loss="entropy"``): the unsupervised entropy objective of AdaMerging
      (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
      https://arxiv.org/abs/2310.02575).

    Minibatches: each task's ``n`` calibration rows are walked in the fixed order
    ``numpy.random.default_rng(seed).permutation(n)``, cycled over epochs; step ``s`` takes
    the ``b = min(batch_size, n)`` rows at positions ``s·b … s·b+b−1`` (mod ``n``) of that
    order. Deterministic for a seed, the same for every call with the same step.

    The module is built once; the first call loads the given tensors (detached) and each
    task's head into it, which checks that they fit. Every call then runs
    ``torch.func.functional_call`` with the call's tensors plus the task's head, so
    gradients reach ``tensors``; non-floating buffers (e.g. ``position_ids``) stay the
    module's own. Tensors are moved to the module's device and dtype (differentiably).
    Build with :func:`build_objective`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        tasks: Sequence[_TaskData],
        *,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        if not tasks:
            raise ConfigError("a calibration objective needs at least one task")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._module = module
        self._tasks = tuple(tasks)
        self.tasks: tuple[str, ...] = tuple(t.name for t in tasks)
        self.device = device
        self.batch_size = batch_size
        self._loaded = False
        self._ref: dict[str, torch.Tensor] = {}
        self._heads: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def losses(self) -> dict[str, Literal["cross_entropy", "entropy"]]:
        """Task name -> the loss it contributes (``cross_entropy`` or ``entropy``)."""
        return {t.name: t.loss for t in self._tasks}

    def batch_indices(self, task: str, step: int) -> np.ndarray:
        """The calibration rows of ``task`` in the minibatch of ``step`` (see the class docstring)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        t = self._task(task)
        n = len(t.order)
        b = min(self.batch_size, n)
        return t.order[(step * b + np.arange(b)) % n]

    def narrow(
        self,
        tasks: Sequence[str] | None = None,
        *,
        loss: Literal["cross_entropy", "entropy"] | None = None,
        batch_size: int | None = None,
    ) -> CalibrationObjective:
        """A view on the same model, data and row orders: only ``tasks`` (all by default),
        ``loss`` instead of each task's own (``entropy`` ignores the labels; ``cross_entropy``
        needs them), ``batch_size`` rows per task and step. Shares this objective's module and,
        once loaded, its loaded tensors and heads.
        """
        names = self.tasks if tasks is None else tuple(tasks)
        chosen = []
        for name in names:
            try:
                t = self._task(name)
            except KeyError:
                raise ConfigError(
                    f"the calibration objective has no task {name!r}; its tasks: {', '.join(self.tasks)}"
                ) from None
            if loss == "entropy":
                t = replace(t, labels=None)
            elif loss == "cross_entropy" and t.labels is None:
                raise ConfigError(
                    f"task {t.name!r}: calibration data {t.uri!r} has no labels ('labels' or 'y'), so it has no cross-entropy"
                )
            chosen.append(t)
        view = CalibrationObjective(
            self._module,
            chosen,
            device=self.device,
            batch_size=self.batch_size if batch_size is None else batch_size,
        )
        if self._loaded:
            view._ref = self._ref
            view._heads = {n: self._heads[n] for n in view.tasks}
            view._loaded = True
        return view

    def _task(self, name: str) -> _TaskData:
        """The task named ``name`` (KeyError when it has none)."""
        for t in self._tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """First call: load the tensors and each head strictly, move the module to the device."""
        base = {k: v.detach() for k, v in tensors.items()}
        own = {k: v for k, v in self._module.state_dict().items() if not v.is_floating_point()}
        for t in self._tasks:
            overlap = sorted(set(t.head) & set(base))
            if overlap:
                raise ConfigError(
                    f"task {t.name!r}: head tensors {overlap[:4]} are also in the merged model; heads hold only tensors the base lacks"
                )
            load_weights(self._module, {**own, **base, **t.head}, "merged")
        self._module.to(self.device).requires_grad_(False)
        self._ref = dict(self._module.state_dict(keep_vars=True))
        self._heads = {
            t.name: {k: _like(v.detach(), self._ref.get(k), self.device) for k, v in t.head.items()}
            for t in self._tasks
        }
        self._loaded = True

    def _forward(
        self, t: _TaskData, params: Mapping[str, torch.Tensor], rows: np.ndarray
    ) -> torch.Tensor:
        """Logits of task ``t``'s rows under ``params`` plus its head."""
        args = (torch.as_tensor(t.x[rows]).to(self.device),) if t.x is not None else ()
        kw = {k: torch.as_tensor(v[rows]).to(self.device) for k, v in t.kwargs.items()}
        try:
            logits = logits_of(
                functional_call(self._module, {**params, **self._heads[t.name]}, args, kw)
            )
        except torch.cuda.OutOfMemoryError:  # not a misfit: the device is full
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise ConfigError(
                f"task {t.name!r}: calibration data {t.uri!r} does not fit the model: {e}"
            ) from e
        if logits.ndim != 2:
            raise ConfigError(
                f"task {t.name!r}: the model gives logits of shape {list(logits.shape)}; a calibration objective needs (batch, classes)"
            )
        return logits

    def __call__(self, tensors: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        """The mean over :attr:`tasks` of each task's loss on its minibatch for ``step``."""
        if not self._loaded:
            self._load(tensors)
        params = {k: _like(v, self._ref.get(k), self.device) for k, v in tensors.items()}
        losses = []
        for t in self._tasks:
            rows = self.batch_indices(t.name, step)
            logits = self._forward(t, params, rows)
            logp = torch.log_softmax(logits.float(), dim=-1)
            if t.labels is None:
                losses.append(-(logp.exp() * logp).sum(-1).mean())
                continue
            y = t.labels[rows]
            if int(y.min()) < 0 or int(y.max()) >= logits.shape[-1]:
                raise ConfigError(
                    f"task {t.name!r}: calibration data {t.uri!r} has labels in [{int(y.min())}, {int(y.max())}] "
                    f"but its head gives {logits.shape[-1]} classes"
                )
            target = torch.as_tensor(y, dtype=torch.long, device=logp.device)
            losses.append(torch.nn.functional.nll_loss(logp, target))
        return torch.stack(losses).mean()


def _like(t: torch.Tensor, ref: torch.Tensor | None, device: str) -> torch.Tensor:
    """``t`` on ``device`` and, when both are floating, in ``ref``'s dtype (differentiably)."""
    if ref is not None and ref.is_floating_point() and t.is_floating_point():
        return t.to(device=device, dtype=ref.dtype)
    return t.to(device=device)


def _read_task(
    task: TaskSpec, read_bytes: ReadBytes, max_examples: int | None
) -> tuple[str, np.ndarray | None, dict[str, np.ndarray], np.ndarray | None]:
    """(uri, positional x, keyword inputs, labels or None) of a task's calibration split."""
    uri = task.calibration_uri()
    if uri is None:
        raise ConfigError(
            f"task {task.name!r} has no calibration data: its data mapping names no 'calibration' split "
            "(add one, or use a '{split}' template with a calibration file)"
        )
    data_format(uri)  # an unknown extension is reported before any read
    try:
        raw = read_bytes(uri)
    except ServiceUnavailable:
        raise
    except (MergeflowError, FileNotFoundError) as e:
        raise ConfigError(f"task {task.name!r} has no calibration data: {e}") from None
    x, kwargs, labels = calibration_inputs(parse_arrays(raw, uri), uri)
    n = len(x) if x is not None else len(next(iter(kwargs.values())))
    if n == 0:
        raise ConfigError(f"task {task.name!r}: calibration data {uri!r} has no examples")
    m = n if max_examples is None else min(n, max_examples)
    return (
        uri,
        None if x is None else x[:m],
        {k: v[:m] for k, v in kwargs.items()},
        None if labels is None else labels[:m],
    )


def build_objective(
    suite: EvaluationSuite,
    model_config: Mapping[str, Any],
    heads: Heads,
    folded: Sequence[str],
    *,
    read_bytes: ReadBytes = read_local_bytes,
    device: str = "cpu",
    batch_size: int = 32,
    max_examples: int | None = None,
    seed: int = 0,
    loss: LossKind = "auto",
    architecture: str | None = None,
) -> CalibrationObjective:
    """The calibration objective of the tasks scorable after folding ``folded``.

    ``folded``: the checkpoint ids folded so far, the incoming one included; the tasks are
    ``suite.tasks_for(folded)``, each scored with its checkpoint's head from ``heads``
    (checkpoint id -> the tensors the base lacks). Only ``accuracy`` (classification)
    tasks have an objective. Each task's calibration split is read here, once (at most
    ``max_examples`` rows); its inputs are ``x`` or the model's keyword arrays, and
    ``labels`` (or ``y``) are optional.

    ``loss``: ``auto`` (default) picks per task: cross-entropy where the calibration data
    have labels, else the entropy of the predicted distribution (AdaMerging);
    ``cross_entropy`` requires labels everywhere; ``entropy`` ignores labels. See
    :class:`CalibrationObjective` for the formula and how minibatches are drawn.

    Raises :class:`~mergeflow.errors.ConfigError` here when a task has another metric,
    no calibration split or file, an empty or inconsistent file, no head, or unlabelled
    data under ``cross_entropy``; data that do not fit the model raise it on the first call.
    """
    if loss not in ("auto", "cross_entropy", "entropy"):
        raise ConfigError(f"loss must be 'auto', 'cross_entropy' or 'entropy', got {loss!r}")
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples must be positive, got {max_examples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    specs = suite.tasks_for(tuple(folded))
    if not specs:
        raise ConfigError(
            f"no task of the evaluation suite is scored after folding {list(folded)}: nothing to calibrate on"
        )
    for task in specs:
        if task.metric != "accuracy":
            raise ConfigError(
                f"task {task.name!r} (metric {task.metric}) has no calibration objective; "
                "only accuracy (classification) tasks can be calibrated on"
            )
    tasks: list[_TaskData] = []
    for task in specs:
        head = head_for(task, heads)
        uri, x, kwargs, labels = _read_task(task, read_bytes, max_examples)
        if loss == "cross_entropy" and labels is None:
            raise ConfigError(
                f"task {task.name!r}: calibration data {uri!r} has no labels ('labels' or 'y'), "
                "so it has no cross-entropy; use loss 'entropy' or 'auto'"
            )
        if loss == "entropy":
            labels = None
        n = len(x) if x is not None else len(next(iter(kwargs.values())))
        order = np.random.default_rng(seed).permutation(n)
        tasks.append(_TaskData(task.name, uri, dict(head), x, kwargs, labels, order))
    module = instantiate(model_config, architecture)
    return CalibrationObjective(module, tasks, device=device, batch_size=batch_size)
