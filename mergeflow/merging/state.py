"""The merge state: everything a continual method needs to continue, nothing that grows with t.

A state is a set of tensors (one float tensor per merged base tensor, same names as
the base) plus this small JSON document. The merged model at any time is
``base + scale * state`` for every merged tensor.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergeflow.merging.projection import ProjectionRule

STATE_FORMAT: Literal["mergeflow.state/1"] = "mergeflow.state/1"


class FoldOptions(BaseModel):
    """Options that change the numbers a fold produces (so they live in the state)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compute_dtype: Literal["float32", "float64"] = Field(
        "float32", description="dtype of the state tensors and of all per-tensor arithmetic"
    )
    missing: Literal["error", "zero"] = Field(
        "error",
        description="a tensor the base has but a checkpoint lacks: refuse, or treat as a zero task vector",
    )


class FoldedCheckpoint(BaseModel):
    """One folded checkpoint: its stable id, content digest and the step it became."""

    model_config = ConfigDict(frozen=True)

    id: str
    digest: str
    step: int


class BaseRef(BaseModel):
    """The base model a state belongs to."""

    model_config = ConfigDict(frozen=True)

    uri: str
    digest: str


class StateInfo(BaseModel):
    """The JSON half of a merge state (see module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["mergeflow.state/1"] = STATE_FORMAT
    method: str
    params: dict[str, Any]
    step: int = 0
    scale: float = 1.0
    scalars: dict[str, float] = Field(
        default_factory=dict, description="the method's Scalars model as JSON (see the methods)"
    )
    checkpoints: tuple[FoldedCheckpoint, ...] = ()
    projection: ProjectionRule
    base: BaseRef
    options: FoldOptions = FoldOptions()
    heads: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="checkpoint id -> names of its tensors the base lacks (task heads)",
    )

    def folded(
        self, checkpoint_id: str | None = None, digest: str | None = None
    ) -> FoldedCheckpoint | None:
        """The folded checkpoint with this id or this digest, if any."""
        for c in self.checkpoints:
            if c.id == checkpoint_id or (digest is not None and c.digest == digest):
                return c
        return None
