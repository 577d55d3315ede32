"""A baseline beside a lineage: the same checkpoints merged by another method, scored the same way.

The demo prints the champion's ACC, normalized ACC and BWT next to those of simple weight
averaging of the same accepted checkpoints, in the same order. Every merge goes through
the engine (``weight_average``, whose step t is the mean of the first t checkpoints, i.e.
``batch_weight_average`` of them) and every score through the same evaluator and test
split as the pipeline; normalized ACC divides each task's score by its checkpoint's own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from mergeflow.architecture import resolve_projection
from mergeflow.evaluation import AccuracyMatrix, build_evaluator, normalized
from mergeflow.evaluation.own import split_checkpoint
from mergeflow.examples.suite import SuiteFiles
from mergeflow.merging.engine import fold, new_state
from mergeflow.merging.export import export
from mergeflow.merging.state import BaseRef
from mergeflow.merging.tensors import DictReader, DictWriter


class Figures(BaseModel):
    """ACC, normalized ACC and BWT (None at one step) of a chain on the test split."""

    model_config = ConfigDict(frozen=True)

    acc: float
    norm_acc: float
    bwt: float | None
    scores: dict[str, float]


def baseline(
    suite: SuiteFiles,
    checkpoint_ids: Sequence[str],
    method: str = "weight_average",
    params: dict[str, Any] | None = None,
) -> Figures:
    """Fold ``checkpoint_ids`` (folder names of ``suite``, in this order) with ``method`` and
    score every step on the test split, as the pipeline scores a lineage."""
    if not checkpoint_ids:
        raise ValueError("a baseline needs at least one checkpoint")
    es = suite.evaluation_suite()
    config = json.loads((suite.base / "config.json").read_text())
    evaluator = build_evaluator(es, model_config=config, model_uri=str(suite.base))
    base = DictReader(load_file(str(suite.base / "model.safetensors")), "base")
    info = new_state(
        method,
        params or {},
        BaseRef(uri=str(suite.base), digest="base"),
        resolve_projection(base, config),
    )
    folder = {p.name: p for p in suite.checkpoints}
    state = None
    heads: dict[str, dict[str, Any]] = {}
    own: dict[str, float] = {}
    matrix = AccuracyMatrix()
    for cid in checkpoint_ids:
        ck = DictReader(load_file(str(folder[cid] / "model.safetensors")), cid)
        alone, head = split_checkpoint(base, ck)
        heads[cid] = head
        mine = [t for t in es.tasks if t.checkpoint == cid]
        own.update(evaluator.evaluate(alone, heads, mine, "test"))
        w = DictWriter()
        info = fold(info, state, base, ck, checkpoint_id=cid, digest=cid, out=w)
        state = w.reader("state")
        merged = DictWriter()
        export(info, state, base, merged)
        tasks = es.tasks_for(list(checkpoint_ids[: info.step]))
        tasks = tuple(sorted(tasks, key=lambda t: list(checkpoint_ids).index(t.checkpoint or "")))
        scores = evaluator.evaluate(merged.reader(f"{method}@{info.step}"), heads, tasks, "test")
        matrix = matrix.append(cid, scores)
    last = matrix.values[-1]
    norm = normalized(last, own)
    return Figures(
        acc=matrix.acc(),
        norm_acc=sum(norm.values()) / len(norm),
        bwt=matrix.bwt(),
        scores=dict(last),
    )
