"""Frozen values that tasks pass to each other (all JSON-serialisable)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergeflow.evaluation.continual import AccuracyMatrix
from mergeflow.storage.sources import CheckpointRef

__all__ = [
    "CheckpointRef",
    "EvalOutput",
    "FoldOutcome",
    "FoldOutput",
    "ModelOutput",
    "OwnScores",
    "ParentState",
]


class ParentState(BaseModel):
    """The state a fold builds on: the last accepted version's, or the step-0 state.

    ``matrix`` is the test-split accuracy matrix of the accepted chain so far and
    ``validation`` the parent's validation scores (what the gate compares against).
    ``chains``: method -> the state that method's candidates fold into (every method's
    state holds the same checkpoints); empty means ``state_uri`` for every candidate.
    """

    model_config = ConfigDict(frozen=True)

    version: str | None
    state_uri: str
    step: int
    folded: tuple[str, ...] = ()
    params: dict[str, Any] = Field(default_factory=dict)
    matrix: AccuracyMatrix = AccuracyMatrix()
    validation: dict[str, float] = Field(default_factory=dict)
    chains: dict[str, str] = Field(default_factory=dict)

    def chain(self, method: str) -> str:
        """The state a candidate of ``method`` folds into."""
        return self.chains.get(method, self.state_uri)


class FoldOutput(BaseModel):
    """One fold written under a fresh prefix."""

    model_config = ConfigDict(frozen=True)

    label: str
    params: dict[str, Any]
    prefix: str
    state_uri: str
    step: int
    folded: tuple[str, ...]
    seconds: float
    peak_rss_mb: float
    stats_seconds: float = 0.0
    """Seconds spent computing the checkpoint's statistics (0 when published or cached)."""
    method: str = ""


class ModelOutput(BaseModel):
    """Merged weights exported next to a state."""

    model_config = ConfigDict(frozen=True)

    model_uri: str
    seconds: float


class EvalOutput(BaseModel):
    """Scores of one merged model: validation (gate, selection) and test (reported)."""

    model_config = ConfigDict(frozen=True)

    validation: dict[str, float] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    datasets: list[dict[str, str]] = Field(default_factory=list)


class OwnScores(BaseModel):
    """Each folded checkpoint's own score on its tasks, a_i(θ_i): the checkpoint alone.

    Task name -> score, per split, for the tasks whose checkpoint's own score is known
    (headless tasks have none). Feeds normalized accuracy and the gate's plasticity check.
    """

    model_config = ConfigDict(frozen=True)

    validation: dict[str, float] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)


class FoldOutcome(BaseModel):
    """What a fold flow did with one checkpoint."""

    model_config = ConfigDict(frozen=True)

    checkpoint_id: str
    status: str  # accepted | rejected | skipped
    version: str | None = None
    step: int | None = None
    reason: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
