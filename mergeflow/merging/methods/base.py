"""What a merging method is: a pure per-tensor function plus a scalar epilogue.

Continual methods keep one state tensor ``D`` per merged base tensor and a scale ``s``
so that the merged model is ``θ₀ + s·D``. A fold streams tensor by tensor:
``fold_tensor`` turns the previous ``D`` and the incoming task vector ``τ = θ_t − θ₀``
into the new ``D``; ``finish`` then updates the method's scalars from whole-model
statistics (norms) gathered during the pass and returns the new scale.

Batch methods merge all checkpoints at once, still tensor by tensor.

Subclass :class:`ContinualMethod` or :class:`BatchMethod` and list the method in
:mod:`mergeflow.merging.methods` (the one registry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.merging.tensors import TauPass


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
    prepared: dict[str, float] = field(default_factory=dict)  # output of ``prepare``


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

    def prepare(self, params: P, taus: TauPass) -> dict[str, float] | None:
        """Optional whole-model pre-pass over the incoming task vectors (may call ``taus()`` repeatedly).

        The result reaches every :meth:`fold_tensor` call as ``TensorStep.prepared``.
        Default: no pre-pass.
        """
        return None

    @abstractmethod
    def fold_tensor(self, params: P, s: TensorStep) -> torch.Tensor:
        """The new state tensor ``D_t`` of one merged tensor."""

    def elementwise(self, params: P, projected: bool) -> bool:
        """Whether :meth:`fold_tensor` acts entry by entry on ``prev`` and ``tau`` for a tensor
        that is (or is not) ``projected``: the engine may then fold it a block of entries at a
        time, so the result must not depend on how the entries are cut."""
        return False

    def finish(self, params: P, scalars: S, stats: FoldStats) -> tuple[S, float]:
        """Return the new scalars and the scale ``s`` of ``θ₀ + s·D``.

        Default, for methods whose params are :class:`ScaledParams`: the scalars unchanged
        and the ``scale`` parameter. Methods with another epilogue override this.
        """
        if not isinstance(params, ScaledParams):
            raise NotImplementedError(f"{type(self).__name__} has no scale parameter")
        return scalars, params.scale


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
