"""Evaluation tasks: score a merged model on validation and test, apply the gate."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence

from prefect import task

from mergeflow.lineage import LineageSpec
from mergeflow.tasks import layout
from mergeflow.tasks.models import EvalOutput, FoldOutput, ModelOutput


@task(name="evaluate", task_run_name="evaluate-{fold.label}")
def evaluate_model(spec: LineageSpec, fold: FoldOutput, model: ModelOutput) -> EvalOutput:
    """Score the merged weights at ``model.model_uri`` with each folded checkpoint's head.

    Validation scores feed the gate and the candidate selection; test scores are the
    only ones reported (MLflow metrics, accuracy matrix).
    """
    from mergeflow.evaluation.evaluators import build_evaluator
    from mergeflow.merging.engine import resolve_device
    from mergeflow.storage import state_store
    from mergeflow.storage.checkpoints import open_checkpoint

    suite = spec.evaluation
    if suite is None:
        return EvalOutput()
    t0 = time.perf_counter()
    tasks = suite.tasks_for(fold.folded)
    st = layout.store(fold.state_uri)
    manifest = state_store.read_manifest(st)
    heads = {}
    for cid in {t.checkpoint for t in tasks if t.checkpoint}:
        r = state_store.heads_reader(st, manifest, cid)
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


def datasets(tasks: Sequence) -> list[dict[str, str]]:
    """``{name, uri, split, digest}`` of each evaluation file (for MLflow ``log_input``)."""
    out = []
    for t in tasks:
        for split in ("validation", "test"):
            uri = t.data_uri(split)
            try:
                digest = hashlib.sha256(layout.read_uri(uri)).hexdigest()[:16]
            except Exception:  # noqa: BLE001 - a digest is informative only
                digest = ""
            out.append({"name": f"{t.name}-{split}", "uri": uri, "split": split, "digest": digest})
    return out


@task(name="gate")
def gate(
    spec: LineageSpec, candidates: Sequence[EvalOutput], champion_validation: Mapping[str, float]
) -> tuple[int, bool, list[str]]:
    """Pick the best candidate that passes the gate on validation scores.

    Returns ``(index, accepted, reasons)``: the winner, or when none passes the best by
    validation ACC with the reasons it failed. Without an evaluation suite everything passes.
    """
    from mergeflow.evaluation.gate import decide, select_candidate

    if spec.evaluation is None:
        return 0, True, []
    hib = spec.evaluation.higher_is_better
    champion = dict(champion_validation) or None
    best = select_candidate(
        [c.validation for c in candidates], spec.gate, champion, higher_is_better=hib
    )
    if best is not None:
        return best, True, []
    decisions = [
        decide(c.validation, champion, spec.gate, higher_is_better=hib) for c in candidates
    ]
    accs = [d.acc if d.acc is not None else float("-inf" if hib else "inf") for d in decisions]
    i = max(range(len(accs)), key=lambda j: accs[j] if hib else -accs[j])
    return i, False, list(decisions[i].reasons)
