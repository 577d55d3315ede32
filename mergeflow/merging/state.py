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
    vocab: Literal["base", "union"] = Field(
        "base",
        description="tokens a checkpoint adds: leave their rows out (base), or grow the merged vocabulary (union)",
    )


class FoldedCheckpoint(BaseModel):
    """One folded checkpoint: its stable id, content digest and the step it became."""

    model_config = ConfigDict(frozen=True)

    id: str
    digest: str
    step: int
    uri: str = Field(
        "",
        description="where it was read from: a pool state records it to merge its pool again "
        "with the next checkpoint (continual folds leave it empty)",
    )


class AddedToken(BaseModel):
    """A token the merged vocabulary gained (``vocab: union``): its row and who introduced it."""

    model_config = ConfigDict(frozen=True)

    token: str
    row: int
    checkpoint: str


class VocabInfo(BaseModel):
    """The vocabulary tensors of a state (rows are tokens) and how the vocabulary changed.

    Rows are aligned by token, not by index (``mergeflow.storage.vocab``); ``added`` rows
    follow the base's tokens in the order they were introduced, and their base value is the
    introducing checkpoint's row (kept beside the state tensors).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensors: tuple[str, ...] = Field(description="the input embedding and output head tensors")
    rows: int = Field(description="the base's rows")
    tied: tuple[str, ...] = Field(
        (),
        description="output-head tensors the base stores but ties to the input embedding: not merged, not written",
    )
    added: tuple[AddedToken, ...] = ()
    left_out: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="vocab: base: checkpoint id -> the tokens it added, left out",
    )

    @property
    def merged_rows(self) -> int:
        """Rows of the merged vocabulary tensors."""
        return max(self.rows, self.added[-1].row + 1) if self.added else self.rows


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
    vocab: VocabInfo | None = Field(
        None,
        description="the vocabulary tensors, when the base has them (None: rows fold by index)",
    )

    def folded(
        self, checkpoint_id: str | None = None, digest: str | None = None
    ) -> FoldedCheckpoint | None:
        """The folded checkpoint with this id or this digest, if any."""
        for c in self.checkpoints:
            if c.id == checkpoint_id or (digest is not None and c.digest == digest):
                return c
        return None
