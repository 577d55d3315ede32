"""What a merging method is: a pure per-tensor function plus a scalar epilogue.

Continual methods keep one state tensor ``D`` per merged base tensor and a scale ``s``
so that the merged model is ``θ₀ + s·D``. A fold streams tensor by tensor:
``fold_tensor`` turns the previous ``D`` and the incoming task vector ``τ = θ_t − θ₀``
into the new ``D``; ``finish`` then updates the method's scalars from whole-model
statistics (norms) gathered during the pass and returns the new scale.

Data-informed methods grow this in three general ways, with no per-method branch in the
engine:

- **statistics in**: a method lists the statistics it reads (``statistics``, e.g.
  ``{"gram"}``, see :mod:`mergeflow.merging.stats`); the engine hands each tensor's
  statistics of the incoming checkpoint to ``fold_tensor`` as ``TensorStep.stats``;
- **extra state tensors**: ``fold_tensor`` may return :class:`Folded`, the new ``D`` plus
  named extra tensors (``slots``, e.g. RegMean's ``A = ΣG̃`` and ``B = ΣG̃τᵀ``); the engine
  stores them as ``<name>:<slot>`` beside ``D`` and hands them back as ``TensorStep.extra``;
- **a whole-model step**: ``prepare`` receives a :class:`WholeModel` (passes over the base,
  the previous merge, the task vector and the statistics, and an :class:`Objective` that
  evaluates a merged model on calibration data) between reading τ and folding; its
  result reaches every ``fold_tensor`` as ``TensorStep.prepared`` (floats, or small
  tensors such as one coefficient per row, so a plan ships to other workers).

Batch methods merge all checkpoints at once, still tensor by tensor. Pool methods merge a
pool of checkpoints by whole-model optimisation on calibration data (:class:`PoolMethod`):
they read each checkpoint tensor by tensor through a :class:`Pool` as often as they need.

Subclass :class:`ContinualMethod` or :class:`BatchMethod` and list the method in
:mod:`mergeflow.merging.methods` (the one registry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.merging.stats import CheckpointStats, StatKind
from mergeflow.merging.tensors import TauPass

Prepared = dict[str, float | torch.Tensor]
"""A whole-model step's result: name -> a float or a small tensor (e.g. a coefficient per row)."""


class MethodParams(BaseModel):
    """Base for method parameters: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ScaledParams(MethodParams):
    """Parameters of a method whose merged model is ``θ₀ + scale·D`` (subclasses set the default)."""

    scale: float = Field(description="s in θ₀ + s·D")


class MethodScalars(BaseModel):
    """Base for a continual method's scalars: whole-model numbers carried from fold to fold."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoScalars(MethodScalars):
    """The scalars of a method that keeps none."""


@dataclass(frozen=True)
class TensorStep:
    """Inputs of one per-tensor fold step (all on the compute device and dtype)."""

    key: str
    step: int  # 1-based index of the incoming checkpoint
    prev: torch.Tensor | None  # previous state tensor D_{t-1}; None when step == 1
    tau: torch.Tensor  # incoming task vector θ_t − θ₀
    projected: bool  # whether the projection rule selects this tensor
    prepared: Prepared = field(default_factory=dict)  # output of ``prepare``
    stats: Mapping[str, torch.Tensor] = field(
        default_factory=dict
    )  # kind -> this tensor's statistic
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)  # slot -> previous extra state


@dataclass(frozen=True)
class Folded:
    """A fold step's result with extra state tensors: the new ``D`` and ``slot -> tensor``."""

    state: torch.Tensor
    extra: Mapping[str, torch.Tensor]


class Objective(Protocol):
    """A differentiable loss of a merged model on calibration data.

    ``tensors``: the merged model's floating-point tensors by base name (they may require
    grad); ``step``: the optimisation step, which picks the minibatch (deterministic for a
    seed). Returns a scalar: the mean over the tasks folded so far of each task's loss.
    """

    tasks: tuple[str, ...]

    def __call__(self, tensors: Mapping[str, torch.Tensor], step: int) -> torch.Tensor: ...


@runtime_checkable
class NarrowableObjective(Objective, Protocol):
    """An :class:`Objective` that gives views of itself on the same data, model and minibatch
    order: some of its ``tasks`` (their mean loss), another ``loss`` (``entropy`` ignores the
    labels; ``cross_entropy`` needs them) or another ``batch_size`` (examples per task and
    step). A method that needs one loss per task, or a second loss, asks for one (FW-Soft:
    a gradient per task for its oracle, the entropy for its coefficients)."""

    def narrow(
        self,
        tasks: Sequence[str] | None = None,
        *,
        loss: Literal["cross_entropy", "entropy"] | None = None,
        batch_size: int | None = None,
    ) -> NarrowableObjective: ...


@dataclass(frozen=True)
class WholeModel:
    """What a method's whole-model step (:meth:`ContinualMethod.prepare`) may read.

    Each pass streams ``(name, tensor)`` over the merged tensors anew: ``taus`` the
    incoming task vectors, ``base`` θ₀, ``merged`` the previous merged task vector
    ``s·D_{t−1}`` (None at step 1). ``stats``: the checkpoint's statistics when it has
    any; ``objective``: calibration loss when the caller supplies data (None otherwise).
    """

    step: int
    taus: TauPass
    base: TauPass
    merged: TauPass | None = None
    stats: CheckpointStats | None = None
    objective: Objective | None = None
    projected: frozenset[str] = frozenset()
    """The tensors the state's projection rule selects (the ``nn.Linear`` weights)."""


@dataclass(frozen=True)
class FoldStats:
    """Whole-model statistics gathered during one fold pass (float64 sums)."""

    step: int
    state_sq_norm: float  # ‖D_t‖² over all merged tensors
    tau_sq_norm: float  # ‖τ_t‖² over all merged tensors


P = TypeVar("P", bound=MethodParams)
S = TypeVar("S", bound=MethodScalars)


class ContinualMethod(ABC, Generic[P, S]):
    """A continual merging method (see module docstring); ``P``/``S`` are its Params/Scalars."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[Literal["continual"]] = "continual"
    Params: ClassVar[type[MethodParams]]
    Scalars: ClassVar[type[MethodScalars]] = NoScalars
    statistics: ClassVar[frozenset[StatKind]] = frozenset()
    """Statistics every folded checkpoint must carry (a fold without them is refused)."""
    slots: ClassVar[tuple[str, ...]] = ()
    """Names of the extra state tensors :meth:`fold_tensor` may return beside ``D``."""
    needs_objective: ClassVar[bool] = False
    """Whether :meth:`prepare` needs calibration data (``WholeModel.objective``)."""

    def prepare(self, params: P, whole: WholeModel) -> Prepared | None:
        """Optional whole-model step before the per-tensor pass (may stream ``whole``'s passes repeatedly).

        The result reaches every :meth:`fold_tensor` call as ``TensorStep.prepared``.
        Default: no step.
        """
        return None

    @abstractmethod
    def fold_tensor(self, params: P, s: TensorStep) -> torch.Tensor | Folded:
        """The new state tensor ``D_t`` of one merged tensor (with extra slots: :class:`Folded`)."""

    def elementwise(self, params: P, projected: bool) -> bool:
        """Whether :meth:`fold_tensor` acts entry by entry on ``prev`` and ``tau`` for a tensor
        that is (or is not) ``projected``: the engine may then fold it a block of entries at a
        time, so the result must not depend on how the entries are cut."""
        return False

    def finish(self, params: P, scalars: S, stats: FoldStats) -> tuple[S, float]:
        """Return the new scalars and the scale ``s`` of ``θ₀ + s·D``.

        Default: the scalars unchanged and the ``scale`` parameter for methods whose params
        are :class:`ScaledParams`, else ``s = 1`` (``D`` is the merged task vector itself).
        Methods with another epilogue override this.
        """
        return scalars, params.scale if isinstance(params, ScaledParams) else 1.0


class BatchMethod(ABC, Generic[P]):
    """A one-shot method: merges all task vectors of one tensor at once; ``P`` is its Params."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[Literal["batch"]] = "batch"
    Params: ClassVar[type[MethodParams]]

    @abstractmethod
    def merge_tensor(
        self, params: P, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """Return ``(D, s)``: the merged model tensor is ``θ₀ + s·D``.

        ``taus`` are fresh tensors owned by the call (``batch_merge`` makes them): the method
        may overwrite them and return one of them as ``D``.
        """

    def linear_scale(self, params: P, n: int) -> float | None:
        """``s`` when every merged tensor is ``θ₀ + s·Σ τ_i`` over ``n`` checkpoints, else None.

        A linear method lets ``batch_merge`` sum the checkpoints directly,
        ``θ₀ + s·(Σ θ_i − n·θ₀)``, instead of forming each ``τ_i``: one pass per input.
        """
        return None


@dataclass(frozen=True)
class Pool:
    """A pool of checkpoints for a :class:`PoolMethod`, read tensor by tensor on demand.

    ``keys``: the merged tensors' names; ``base(k)``: θ₀ of one tensor; ``tau(i, k)``: the
    task vector of checkpoint ``i`` for one tensor (read anew on every call, so memory does
    not grow with ``size``). All in the compute dtype, on the compute device.
    """

    keys: tuple[str, ...]
    size: int
    base: Callable[[str], torch.Tensor]
    tau: Callable[[int, str], torch.Tensor]
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObjectiveOptions:
    """How a caller builds a pool method's calibration :class:`Objective`: examples per task
    and step, the seed of the minibatch order, the loss (``auto``: cross-entropy where the
    data have labels, entropy otherwise)."""

    batch_size: int = 32
    seed: int = 0
    loss: Literal["auto", "cross_entropy", "entropy"] = "auto"


class PoolMethod(ABC, Generic[P]):
    """A one-shot merge of a pool by whole-model optimisation on calibration data; ``P`` its Params."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[Literal["pool"]] = "pool"
    Params: ClassVar[type[MethodParams]]

    def objective_options(self, params: P) -> ObjectiveOptions:
        """The objective this method learns on. Default: its ``batch_size``, ``seed`` and
        ``loss`` parameters where it has them."""
        d = ObjectiveOptions()
        return ObjectiveOptions(
            batch_size=int(getattr(params, "batch_size", d.batch_size)),
            seed=int(getattr(params, "seed", d.seed)),
            loss=getattr(params, "loss", d.loss),
        )

    @abstractmethod
    def merge(
        self, params: P, pool: Pool, objective: Objective, log: Callable[[str], None]
    ) -> dict[str, torch.Tensor]:
        """The merged task vector ``θ̄ − θ₀`` of every tensor in ``pool.keys``; ``log`` reports progress."""
