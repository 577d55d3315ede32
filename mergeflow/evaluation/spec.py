"""Frozen configs for evaluation and gating, meant to sit inside a lineage YAML spec.

Example (the ``evaluation:`` and ``gate:`` blocks of a lineage spec)::

    evaluation:
      batch_size: 256
      tasks:
        - name: rot90                     # unique; used as the MLflow metric key
          checkpoint: 01-rot90            # id of the checkpoint whose head scores it
          data: s3://bucket/digits/rot90/{split}.npz   # {split} -> validation | test | calibration
          metric: accuracy                # accuracy | perplexity | my_pkg.evals:score
        - name: wiki
          data: {validation: ./val.txt, test: ./test.txt}   # no calibration split
          metric: perplexity
          options: {block_size: 128}
    gate:
      min_acc: 0.5          # candidate ACC must be >= this
      max_forgetting: 0.05  # each task the champion covers may lose at most this
      max_drop: 0.03        # ... and their mean at most this
      min_retention: 0.9    # the new task keeps >= 90 % of its own checkpoint's score
      task_floors: {rot90: 0.6}

An lm-evaluation-harness task (``pip install 'mergeflow[lmeval]'``) names the harness task
per split in ``data`` (its data come from the task's YAML)::

        - name: qa
          metric: lm_eval
          data: {validation: qa_val, test: qa_test}    # or qa_{split}
          options: {include_path: ./lm_tasks, metric: acc, limit: 200, batch_size: 8}

Splits: selection and the gate read ``validation``; every reported score reads ``test``;
data-informed merging methods (those that learn from data, e.g. AdaMerging's coefficients)
read only ``calibration`` (:mod:`mergeflow.evaluation.calibration`), never the two splits
they are judged on. A template's ``{split}`` becomes ``calibration`` for it (the file may
be absent when no method needs it); a mapping names it under an optional ``calibration``
key. Example suites draw their calibration split from each task's training data.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Split = Literal["validation", "test"]
"""An evaluation split: ``validation`` (selection, the gate) or ``test`` (reported scores)."""
SPLITS: tuple[Split, ...] = ("validation", "test")
CALIBRATION = "calibration"
"""The split learning methods read (never evaluated on)."""
DATA_KEYS: tuple[str, ...] = (*SPLITS, CALIBRATION)
"""The keys a ``data`` mapping may hold (``validation`` and ``test`` required)."""
BUILTIN_METRICS: dict[str, bool] = {"accuracy": True, "perplexity": False, "lm_eval": True}
"""Built-in metric name -> higher is better (``lm_eval``: see :attr:`TaskSpec.higher_is_better`)."""
LM_EVAL_LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "ter")
"""lm-eval metric names (``word_perplexity`` ... by suffix) where lower is better."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-/ ]+$")
_USER_METRIC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

OptionValue = str | int | float | bool


class TaskSpec(BaseModel):
    """One evaluation task.

    - ``name``: unique in the suite; letters, digits, ``_ . - /`` and spaces (an MLflow
      metric key).
    - ``checkpoint``: the id of the checkpoint whose task-specific tensors (its head) score
      this task. The task counts as *folded* from the step that folds this checkpoint and
      cannot be scored before (it has no head yet). ``None``: the task needs no head and is
      scored at every step (e.g. LM perplexity); it is not part of ACC/BWT bookkeeping by
      checkpoint and counts from step 1.
    - ``data``: where the split lives: a URI template containing ``{split}`` or a mapping
      ``{validation: uri, test: uri}`` with an optional ``calibration: uri`` (the split
      data-informed merging methods learn from, see :meth:`calibration_uri`). Classification data: ``.npz``, ``.safetensors`` or
      ``.parquet`` holding ``labels`` (or ``y``) plus inputs: ``x`` (passed positionally) or
      model keyword arrays (``pixel_values``, ``input_ids``, ``attention_mask``,
      ``token_type_ids``). Perplexity data: a UTF-8 text file.
    - ``metric``: ``accuracy`` (higher is better), ``perplexity`` (lower is better),
      ``lm_eval`` (an lm-evaluation-harness task; ``data`` then names the harness task of
      each split) or a user evaluator ``module:function`` (see
      :mod:`mergeflow.evaluation.evaluators`).
    - ``options``: metric options (``perplexity``: ``block_size``; ``lm_eval``: see
      :class:`~mergeflow.evaluation.lm_eval.LmEvalEvaluator`; user metrics: anything,
      ``higher_is_better`` defaults to true).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    checkpoint: str | None = None
    data: str | dict[str, str]
    metric: str = "accuracy"
    options: dict[str, OptionValue] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or not _NAME.match(v):
            raise ValueError(
                f"task name {v!r} must be non-empty and use only letters, digits, '_', '.', '-', '/', ' '"
            )
        return v

    @field_validator("data")
    @classmethod
    def _data_ok(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(v, str):
            if "{split}" not in v:
                raise ValueError(
                    f"data {v!r} must contain '{{split}}' or be a mapping with 'validation' and 'test'"
                )
        else:
            missing = [s for s in SPLITS if s not in v]
            if missing:
                raise ValueError(
                    f"data mapping lacks {missing}: it needs both 'validation' and 'test'"
                )
            unknown = sorted(k for k in v if k not in DATA_KEYS)
            if unknown:
                raise ValueError(
                    f"data mapping has unknown keys {unknown}: allowed are 'validation', 'test' and 'calibration'"
                )
        return v

    @field_validator("metric")
    @classmethod
    def _metric_ok(cls, v: str) -> str:
        if v not in BUILTIN_METRICS and not _USER_METRIC.match(v):
            raise ValueError(
                f"metric {v!r} is neither one of {sorted(BUILTIN_METRICS)} nor 'module:function'"
            )
        return v

    @property
    def higher_is_better(self) -> bool:
        """The metric's direction; ``higher_is_better`` in ``options`` overrides it for
        ``lm_eval`` and user metrics (``lm_eval`` defaults by the harness metric's name:
        perplexities, ``bits_per_byte`` and ``ter`` are lower-is-better)."""
        if "higher_is_better" in self.options and self.metric not in ("accuracy", "perplexity"):
            return bool(self.options["higher_is_better"])
        if self.metric == "lm_eval":
            name = str(self.options.get("metric", "acc"))
            return not name.endswith(LM_EVAL_LOWER_IS_BETTER)
        if self.metric in BUILTIN_METRICS:
            return BUILTIN_METRICS[self.metric]
        return True

    def data_uri(self, split: Split) -> str:
        """The URI of one split's data."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(self.data, str):
            return self.data.replace("{split}", split)
        return self.data[split]

    def calibration_uri(self) -> str | None:
        """The URI of the calibration split (learning methods read only this one), or None
        when the ``data`` mapping names none. A template always gives one; its file may not exist."""
        if isinstance(self.data, str):
            return self.data.replace("{split}", CALIBRATION)
        return self.data.get(CALIBRATION)


class EvaluationSuite(BaseModel):
    """The tasks a lineage is scored on (see the module docstring for the YAML form).

    All tasks must share one direction (higher- or lower-is-better) because ACC, BWT and
    the gate average them. ``tokenizer``: URI of a ``tokenizer.json`` for perplexity tasks;
    by default the pipeline passes the base model's own tokenizer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[TaskSpec, ...]
    batch_size: int = Field(256, gt=0)
    max_examples: int | None = Field(None, gt=0, description="cap on examples per task and split")
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSuite:
        if not self.tasks:
            raise ValueError("an evaluation suite needs at least one task")
        seen: set[str] = set()
        for t in self.tasks:
            if t.name in seen:
                raise ValueError(f"task name {t.name!r} appears twice")
            seen.add(t.name)
        directions = {t.higher_is_better for t in self.tasks}
        if len(directions) > 1:
            hi = [t.name for t in self.tasks if t.higher_is_better]
            lo = [t.name for t in self.tasks if not t.higher_is_better]
            raise ValueError(
                f"tasks mix higher-is-better {hi} and lower-is-better {lo} metrics; ACC, BWT and the gate need one direction"
            )
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.tasks[0].higher_is_better

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def tasks_for(self, folded_checkpoints: list[str] | tuple[str, ...]) -> tuple[TaskSpec, ...]:
        """Tasks scorable after folding these checkpoints: headless ones plus theirs."""
        folded = set(folded_checkpoints)
        return tuple(t for t in self.tasks if t.checkpoint is None or t.checkpoint in folded)


class GateSpec(BaseModel):
    """When a fold is accepted. Every check is optional and runs on **validation** scores.

    The champion is the last accepted version (the fold's parent); the *old* tasks are the
    ones it was scored on, the *new* tasks the ones scored for the first time (the tasks of
    the checkpoint being folded). Old tasks are compared with the champion's scores on the
    same tasks, never with a mean over another set of tasks.

    - ``min_acc``: the candidate's ACC (mean over its scored tasks) must be at least this
      (for a lower-is-better suite: at most this).
    - ``max_forgetting``: **forgetting**, per task: on each old task the candidate may score
      at most this much below the champion (lower-is-better: above). Ignored while there
      is no champion.
    - ``max_drop``: the same on average: the candidate's mean over the old tasks may be at
      most this much below the champion's ACC over them (lower-is-better: above).
    - ``min_retention``: **plasticity**: each new task must keep at least this share of its
      own checkpoint's score, i.e. the normalized score a_t(θ̄_t)/a_t(θ_t) (lower-is-better:
      a_t(θ_t)/a_t(θ̄_t)) must be at least this. Tasks without an own score (headless
      tasks) are not checked.
    - ``task_floors``: task name -> minimum score (lower-is-better: maximum). A floor for a
      task not scored yet (its checkpoint not folded) does not apply.

    Differences are in the metric's units (accuracy points, perplexity). An empty gate
    accepts everything that has finite scores.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_acc: float | None = None
    max_drop: float | None = Field(None, ge=0)
    max_forgetting: float | None = Field(None, ge=0)
    min_retention: float | None = Field(None, gt=0)
    task_floors: dict[str, float] = Field(default_factory=dict)

    @field_validator("min_acc")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and v != v:
            raise ValueError("min_acc must be a number, not NaN")
        return v
