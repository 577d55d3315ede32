"""Evaluation tasks: score a merged model on validation and test, apply the gate."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task

from mergeflow.evaluation.evaluators import build_evaluator
from mergeflow.evaluation.gate import GateChoice, choose
from mergeflow.evaluation.spec import TaskSpec
from mergeflow.lineage import LineageSpec
from mergeflow.merging.engine import resolve_device
from mergeflow.storage import states
from mergeflow.storage.schemes import open_checkpoint
from mergeflow.tasks import layout
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import EvalOutput, FoldOutput, ModelOutput


@task(name="evaluate", task_run_name="evaluate-{fold.label}")
def evaluate_model(spec: LineageSpec, fold: FoldOutput, model: ModelOutput) -> EvalOutput:
    """Score the merged weights at ``model.model_uri`` with each folded checkpoint's head.

    Validation scores feed the gate and the candidate selection; test scores are the
    only ones reported (MLflow metrics, accuracy matrix).
    """
    suite = spec.evaluation
    if suite is None:
        return EvalOutput()
    t0 = time.perf_counter()
    tasks = suite.tasks_for(fold.folded)
    st = layout.store(fold.state_uri)
    manifest = states.read_manifest(st)
    heads = {}
    for cid in {t.checkpoint for t in tasks if t.checkpoint}:
        r = states.heads_reader(st, manifest, cid)
        heads[cid] = {k: r.get(k) for k in r.keys()} if r is not None else {}
    merged = open_checkpoint(model.model_uri)
    evaluator = build_evaluator(
        suite,
        model_config=merged.config,
        read_bytes=layout.read_uri,
        device=str(resolve_device(spec.device)),
    )
    validation = evaluator.evaluate(merged.reader, heads, tasks, "validation")
    test = evaluator.evaluate(merged.reader, heads, tasks, "test")
    return EvalOutput(
        validation=validation, test=test, seconds=time.perf_counter() - t0, datasets=datasets(tasks)
    )


def datasets(tasks: Sequence[TaskSpec]) -> list[dict[str, str]]:
    """``{name, uri, split, digest}`` of each evaluation file (for MLflow ``log_input``)."""
    out = []
    for t in tasks:
        for split in ("validation", "test"):
            uri = t.data_uri(split)
            try:
                digest = hashlib.sha256(layout.read_uri(uri)).hexdigest()[:16]
            except Exception:
                digest = ""
            out.append({"name": f"{t.name}-{split}", "uri": uri, "split": split, "digest": digest})
    return out


@task(name="gate")
def gate(
    spec: LineageSpec, candidates: Sequence[EvalOutput], champion_validation: Mapping[str, float]
) -> GateChoice:
    """:func:`mergeflow.evaluation.gate.choose` on validation scores; all pass without a suite."""
    if spec.evaluation is None:
        return GateChoice(index=0, accepted=True, reasons=[])
    return choose(
        [c.validation for c in candidates],
        spec.gate,
        dict(champion_validation) or None,
        higher_is_better=spec.evaluation.higher_is_better,
    )


@task(name="save-evaluation", **io_task)
def save_evaluation(prefix: str, doc: dict[str, Any], name: str = layout.EVALUATION_FILE) -> None:
    """Write a step's scores (and its chain's accuracy matrix) next to its state."""
    layout.write_evaluation(prefix, doc, name)
