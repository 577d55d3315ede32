"""What a merging method is: a pure per-tensor function plus a scalar epilogue.

Continual methods keep one state tensor ``D`` per merged base tensor and a scalar
coefficient ``c`` so that the merged model is ``θ₀ + c·D``. A fold streams tensor by
tensor: ``fold_tensor`` turns the previous ``D`` and the incoming task vector
``τ = θ_t − θ₀`` into the new ``D``; ``finish`` then updates scalars from whole-model
statistics (norms) gathered during the pass.

Batch methods merge all checkpoints at once, still tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base for method parameters: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class TensorStep:
    """Inputs of one per-tensor fold step (all on the compute device and dtype)."""

    key: str
    step: int  # 1-based index of the incoming checkpoint
    prev: torch.Tensor | None  # previous state tensor D_{t-1}; None when step == 1
    tau: torch.Tensor  # incoming task vector θ_t − θ₀
    projected: bool  # whether the projection rule selects this tensor
    prepared: dict[str, Any] = field(default_factory=dict)  # output of ``prepare``


@dataclass(frozen=True)
class FoldStats:
    """Whole-model statistics gathered during one fold pass (float64 sums)."""

    step: int
    state_sq_norm: float  # ‖D_t‖² over all merged tensors
    tau_sq_norm: float  # ‖τ_t‖² over all merged tensors


TauPass = Callable[[], Iterator[tuple[str, torch.Tensor]]]


class ContinualMethod(Protocol):
    """A continual merging method (see module docstring)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]]

    def fold_tensor(self, params: Any, s: TensorStep) -> torch.Tensor: ...

    def finish(
        self, params: Any, scalars: dict[str, float], stats: FoldStats
    ) -> tuple[dict[str, float], float]:
        """Return the new scalars and the coefficient ``c`` of ``θ₀ + c·D``."""
        ...

    def prepare(self, params: Any, taus: TauPass) -> dict[str, Any] | None:
        """Optional pre-pass over the incoming task vectors (may call ``taus()`` repeatedly)."""
        ...


class BatchMethod(Protocol):
    """A one-shot method: merges all task vectors of one tensor at once."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]]

    def merge_tensor(
        self, params: Any, key: str, taus: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """Return ``(D, c)``: the merged model tensor is ``θ₀ + c·D``."""
        ...


def no_prepare(params: Any, taus: TauPass) -> None:
    """Default ``prepare``: no pre-pass."""
    return None
