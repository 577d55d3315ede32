"""Evaluation tasks: score a merged model on validation and test, a checkpoint alone, the gate."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task

from mergeflow.evaluation.evaluators import build_evaluator
from mergeflow.evaluation.gate import GateChoice, chain_heads, choose
from mergeflow.evaluation.own import own_key, split_checkpoint
from mergeflow.evaluation.spec import EvaluationSuite, TaskSpec
from mergeflow.lineage import LineageSpec
from mergeflow.merging.engine import resolve_device
from mergeflow.storage import states
from mergeflow.storage.schemes import open_checkpoint
from mergeflow.tasks import layout
from mergeflow.tasks.retry import io_task
from mergeflow.tasks.values import (
    CheckpointRef,
    EvalOutput,
    FoldOutput,
    ModelOutput,
    OwnScores,
    ParentState,
)

OWN_SCORES_DIR = "own-scores"
"""Under the lineage's store: ``own-scores/<digest>.json``, one checkpoint's own scores."""


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
        model_uri=model.model_uri,
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
    spec: LineageSpec,
    candidates: Sequence[EvalOutput],
    champion_validation: Mapping[str, float],
    own: OwnScores | None = None,
    methods: Sequence[str] = (),
) -> GateChoice:
    """:func:`mergeflow.evaluation.gate.choose` on validation scores (all pass without a suite),
    with each method's chain head (:func:`~mergeflow.evaluation.gate.chain_heads`) when
    ``methods`` names the candidates' methods."""
    if spec.evaluation is None:
        scores: list[dict[str, float]] = [{} for _ in candidates]
        heads = chain_heads(scores, methods, spec.gate) if methods else {}
        return GateChoice(index=0, accepted=True, reasons=[], heads=heads)
    args: dict[str, Any] = {
        "champion_scores": dict(champion_validation) or None,
        "higher_is_better": spec.evaluation.higher_is_better,
        "own_scores": own.validation if own is not None else None,
    }
    validation = [c.validation for c in candidates]
    choice = choose(validation, spec.gate, **args)
    if not methods:
        return choice
    heads = chain_heads(validation, methods, spec.gate, **args)
    return choice.model_copy(update={"heads": heads})


def _own_path(digest: str) -> str:
    return f"{OWN_SCORES_DIR}/{digest.replace(':', '-')}.json"


def _score_alone(
    spec: LineageSpec, suite: EvaluationSuite, ck: CheckpointRef, tasks: list[TaskSpec]
) -> dict[str, dict[str, float]]:
    """Score checkpoint ``ck`` alone (its weights and head) on ``tasks``, both splits."""
    base = layout.open_base(spec)
    opened = open_checkpoint(ck.uri, base=base.reader, allow_pickle=spec.allow_pickle)
    reader, head = split_checkpoint(base.reader, opened.reader)
    evaluator = build_evaluator(
        suite,
        model_config=base.config,
        read_bytes=layout.read_uri,
        device=str(resolve_device(spec.device)),
        model_uri=spec.base,
    )
    heads = {ck.id: head}
    return {s: evaluator.evaluate(reader, heads, tasks, s) for s in ("validation", "test")}


@task(name="own-scores", task_run_name="own-scores-{ck.id}")
def own_scores(
    spec: LineageSpec, ck: CheckpointRef, parent: ParentState, new: Sequence[CheckpointRef] = ()
) -> OwnScores:
    """a_i(θ_i) for the tasks of ``ck`` (and of ``new``) and of every checkpoint the parent
    state folded.

    Computed once per checkpoint (``ck`` alone, validation and test) and cached on the
    lineage's store as ``own-scores/<digest>.json``, keyed by task definition
    (:func:`~mergeflow.evaluation.own.own_key`); earlier checkpoints are read from there
    (one whose scores are not cached is left out). ``new``: other checkpoints that enter the
    chain with ``ck`` (a pool merge's), scored like it.
    """
    suite = spec.evaluation
    if suite is None:
        return OwnScores()
    manifest = states.read_manifest(layout.store(parent.state_uri))
    refs = [CheckpointRef(id=c.id, uri="", digest=c.digest) for c in manifest.info.checkpoints]
    st = layout.store(spec.store)
    out: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    entering = [*new, ck]
    for ref in [*refs, *entering]:
        tasks = [t for t in suite.tasks if t.checkpoint == ref.id]
        if not tasks or not ref.digest:
            continue
        path = _own_path(ref.digest)
        cached = json.loads(st.read_bytes(path)) if st.exists(path) else {}
        keys = {t.name: own_key(t, suite) for t in tasks}
        if ref in entering and any(cached.get(n, {}).get("key") != k for n, k in keys.items()):
            scores = _score_alone(spec, suite, ref, tasks)
            cached = {n: {"key": keys[n], **{s: scores[s][n] for s in scores}} for n in keys}
            st.write_bytes(path, json.dumps(cached, indent=2, sort_keys=True).encode())
        for n, k in keys.items():
            if cached.get(n, {}).get("key") == k:
                out["validation"][n] = cached[n]["validation"]
                out["test"][n] = cached[n]["test"]
    return OwnScores(**out)


@task(name="save-evaluation", **io_task)
def save_evaluation(prefix: str, doc: dict[str, Any], name: str = layout.EVALUATION_FILE) -> None:
    """Write a step's scores (and its chain's accuracy matrix) next to its state."""
    layout.write_evaluation(prefix, doc, name)
