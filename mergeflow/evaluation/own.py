"""A checkpoint alone: the model and head that score its own tasks, a_i(θ_i).

Normalized accuracy a_i(θ̄_t)/a_i(θ_i) and the gate's plasticity check need each
checkpoint's own score on its tasks. :func:`split_checkpoint` presents the checkpoint the
way evaluators see a merged model: a reader over the base's tensor names plus the tensors
the base lacks (its head). :func:`own_key` says what an own score depends on, so a cached
one is reused only for the same task definition.
"""

from __future__ import annotations

import json

import torch

from mergeflow.evaluation.spec import EvaluationSuite, TaskSpec
from mergeflow.merging.tensors import SAFETENSORS_DTYPES, DictReader, TensorReader


def split_checkpoint(
    base: TensorReader, checkpoint: TensorReader
) -> tuple[TensorReader, dict[str, torch.Tensor]]:
    """(the checkpoint under the base's names, its head: the tensors the base lacks).

    A base tensor the checkpoint lacks, or holds as a non-float tensor, is taken from the
    base, as the fold does (a zero task vector; integer buffers are copied from the base);
    float tensors take the base's dtype, as an exported merge does.
    """
    own = set(checkpoint.keys())
    tensors = {}
    for k in base.keys():
        take = k in own and checkpoint.meta(k).is_float and base.meta(k).is_float
        tensors[k] = (
            checkpoint.get(k).to(SAFETENSORS_DTYPES[base.meta(k).dtype]) if take else base.get(k)
        )
    names = set(tensors)
    head = {k: checkpoint.get(k) for k in checkpoint.keys() if k not in names}
    return DictReader(tensors, checkpoint.source), head


def own_key(task: TaskSpec, suite: EvaluationSuite) -> str:
    """What a task's own score depends on besides the checkpoint's digest (a cache key)."""
    return json.dumps(
        {
            "metric": task.metric,
            "data": task.data,
            "options": task.options,
            "max_examples": suite.max_examples,
        },
        sort_keys=True,
    )
