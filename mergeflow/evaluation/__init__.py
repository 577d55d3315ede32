"""Scoring merged models: evaluators, continual metrics (ACC, BWT), the gate and candidate selection."""

from mergeflow.evaluation.continual import (
    AccuracyMatrix,
    continual_metrics,
    forgetting,
    gate_metrics,
    matrix_from_rows,
    normalized,
    plot_accuracy_matrix,
)
from mergeflow.evaluation.evaluators import (
    ClassificationEvaluator,
    EvalContext,
    Evaluator,
    Heads,
    LmEvalEvaluator,
    PerplexityEvaluator,
    SuiteEvaluator,
    build_evaluator,
    load_tokenizer,
    load_user_evaluator,
)
from mergeflow.evaluation.gate import (
    GateChoice,
    GateDecision,
    chain_heads,
    choose,
    decide,
    select_candidate,
)
from mergeflow.evaluation.harness import load_hf_tokenizer
from mergeflow.evaluation.models import (
    ARCHITECTURES,
    instantiate,
    load_weights,
    register_architecture,
)
from mergeflow.evaluation.spec import EvaluationSuite, GateSpec, Split, TaskSpec

__all__ = [
    "ARCHITECTURES",
    "AccuracyMatrix",
    "ClassificationEvaluator",
    "EvalContext",
    "EvaluationSuite",
    "Evaluator",
    "GateChoice",
    "GateDecision",
    "GateSpec",
    "Heads",
    "LmEvalEvaluator",
    "PerplexityEvaluator",
    "Split",
    "SuiteEvaluator",
    "TaskSpec",
    "build_evaluator",
    "continual_metrics",
    "decide",
    "chain_heads",
    "choose",
    "forgetting",
    "gate_metrics",
    "instantiate",
    "load_hf_tokenizer",
    "load_tokenizer",
    "load_user_evaluator",
    "load_weights",
    "matrix_from_rows",
    "normalized",
    "plot_accuracy_matrix",
    "register_architecture",
    "select_candidate",
]
