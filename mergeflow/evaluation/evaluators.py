"""Evaluators: score a merged model (a :class:`TensorReader`) on tasks, free of Prefect and MLflow.

Contract (:class:`Evaluator`)::

    evaluate(model, heads, tasks, split) -> {task name: score}

- ``model``: the merged model's tensors (the base's names), read through the engine's reader;
- ``heads``: checkpoint id -> that checkpoint's task-specific tensors (those the base lacks),
  e.g. ``{"01-rot90": {"classifier.weight": ..., "classifier.bias": ...}}``;
- ``tasks``: the tasks to score; each classification task with a ``checkpoint`` is scored
  with that checkpoint's head, which must be in ``heads``;
- ``split``: ``"validation"`` (selection and the gate) or ``"test"`` (every reported score).

Built in: ``accuracy`` (:class:`ClassificationEvaluator`), ``perplexity``
(:class:`PerplexityEvaluator`), ``lm_eval`` (:class:`~mergeflow.evaluation.harness.LmEvalEvaluator`,
lm-evaluation-harness tasks; optional extra ``mergeflow[lmeval]``). A task whose metric is ``module:function`` is scored by
that function, called as ``function(model, heads, tasks, split)`` (plus ``context=`` an
:class:`EvalContext` when the function has a ``context`` parameter) with the tasks that
name it; it must return a finite float for each of them.
:func:`build_evaluator` returns one :class:`SuiteEvaluator` dispatching on each task's metric.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mergeflow.errors import ConfigError
from mergeflow.evaluation.data import (
    ReadBytes,
    data_format,
    parse_arrays,
    read_local_bytes,
    split_inputs,
)
from mergeflow.evaluation.harness import LmEvalEvaluator, load_hf_tokenizer
from mergeflow.evaluation.models import Heads, ModelCache, head_for, logits_of
from mergeflow.evaluation.spec import EvaluationSuite, Split, TaskSpec
from mergeflow.merging.tensors import TensorReader

__all__ = [
    "ClassificationEvaluator",
    "EvalContext",
    "Evaluator",
    "Heads",
    "LmEvalEvaluator",
    "PerplexityEvaluator",
    "SuiteEvaluator",
    "build_evaluator",
    "load_tokenizer",
    "load_user_evaluator",
]


@runtime_checkable
class Evaluator(Protocol):
    """Scores a merged model on tasks (see the module docstring for the contract)."""

    def evaluate(
        self, model: TensorReader, heads: Heads, tasks: Sequence[TaskSpec], split: Split
    ) -> dict[str, float]: ...


@dataclass(frozen=True)
class EvalContext:
    """What a user evaluator may need besides the model: config, data access, device.

    ``model_uri``: the HF folder of the model being scored (or of its base), where
    tokenizer files are read from (``lm_eval`` tasks); None when unknown.
    """

    model_config: Mapping[str, Any] | None
    read_bytes: ReadBytes
    device: str
    batch_size: int
    max_examples: int | None
    model_uri: str | None = None


class ClassificationEvaluator:
    """Accuracy: argmax of the logits vs ``labels``, each task with its own head.

    ``model_config``: the base's HF ``config.json`` (or a registry config, see
    :mod:`mergeflow.evaluation.models`). Data per task and split: see :class:`TaskSpec`.
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        *,
        read_bytes: ReadBytes = read_local_bytes,
        batch_size: int = 256,
        max_examples: int | None = None,
        device: str = "cpu",
        architecture: str | None = None,
    ) -> None:
        self._models = ModelCache(model_config, architecture, device)
        self._read = read_bytes
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.device = device
        self._data: dict[str, tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray]] = {}

    def _load(self, uri: str) -> tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray]:
        if uri not in self._data:
            data_format(uri)  # an unknown extension is reported before any read
            self._data[uri] = split_inputs(parse_arrays(self._read(uri), uri), uri)
        return self._data[uri]

    def evaluate(
        self, model: TensorReader, heads: Heads, tasks: Sequence[TaskSpec], split: Split
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in tasks:
            head = head_for(task, heads)
            x, kwargs, labels = self._load(task.data_uri(split))
            n = len(labels) if self.max_examples is None else min(len(labels), self.max_examples)
            if n == 0:
                raise ConfigError(
                    f"task {task.name!r}: {split} data {task.data_uri(split)!r} has no examples"
                )
            module = self._models.get(model, head)
            correct = 0
            with torch.inference_mode():
                for i in range(0, n, self.batch_size):
                    sl = slice(i, min(i + self.batch_size, n))
                    args = [torch.as_tensor(x[sl]).to(self.device)] if x is not None else []
                    kw = {k: torch.as_tensor(v[sl]).to(self.device) for k, v in kwargs.items()}
                    logits = logits_of(module(*args, **kw))
                    pred = logits.argmax(-1).cpu()
                    correct += int((pred == torch.as_tensor(labels[sl])).sum())
            out[task.name] = correct / n
        return out


def load_tokenizer(data: bytes) -> Any:
    """A ``tokenizers.Tokenizer`` from the bytes of a ``tokenizer.json``."""
    # tokenizers: only for perplexity
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:
        raise ConfigError(f"not a valid tokenizer.json: {e}") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens: HF tokenizers are callable, ``tokenizers`` ones are not."""
    if callable(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


class PerplexityEvaluator:
    """Causal-LM perplexity of a UTF-8 text file, tokenized with the model's own tokenizer.

    The text is tokenized whole (no special tokens added) and cut into consecutive,
    non-overlapping blocks of ``block_size`` tokens (task option; default the config's
    ``n_positions`` / ``max_position_embeddings``, at most 1024); a last shorter block is
    kept when it has at least 2 tokens. Within each block token k is predicted from tokens
    < k. Perplexity = exp(sum of token NLLs / number of predicted tokens).
    ``max_examples`` caps the number of blocks.
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        tokenizer: Any,
        *,
        read_bytes: ReadBytes = read_local_bytes,
        batch_size: int = 8,
        max_examples: int | None = None,
        device: str = "cpu",
        architecture: str | None = None,
    ) -> None:
        if tokenizer is None:
            raise ConfigError(
                "perplexity needs the model's tokenizer (tokenizer.json beside the base, or the suite's 'tokenizer')"
            )
        self._models = ModelCache(model_config, architecture, device)
        self.tokenizer = tokenizer
        self._read = read_bytes
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.device = device
        cfg = model_config
        self.default_block = int(
            min(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 1024, 1024)
        )
        self._ids: dict[str, list[int]] = {}

    def _tokens(self, uri: str) -> list[int]:
        if uri not in self._ids:
            try:
                text = self._read(uri).decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"perplexity data {uri!r} is not UTF-8 text") from None
            self._ids[uri] = _encode(self.tokenizer, text)
        return self._ids[uri]

    def evaluate(
        self, model: TensorReader, heads: Heads, tasks: Sequence[TaskSpec], split: Split
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for task in tasks:
            block = int(task.options.get("block_size", self.default_block))
            if block < 2:
                raise ConfigError(f"task {task.name!r}: block_size must be at least 2, got {block}")
            ids = self._tokens(task.data_uri(split))
            blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
            blocks = [b for b in blocks if len(b) >= 2]
            if self.max_examples is not None:
                blocks = blocks[: self.max_examples]
            if not blocks:
                raise ConfigError(
                    f"task {task.name!r}: {split} text {task.data_uri(split)!r} has fewer than 2 tokens"
                )
            module = self._models.get(model, head_for(task, heads))
            nll, count = 0.0, 0
            with torch.inference_mode():
                full = [b for b in blocks if len(b) == block]
                rest = [b for b in blocks if len(b) != block]
                groups = [
                    full[i : i + self.batch_size] for i in range(0, len(full), self.batch_size)
                ] + [[b] for b in rest]
                for group in groups:
                    inp = torch.tensor(group, dtype=torch.long, device=self.device)
                    logits = logits_of(module(input_ids=inp)).double()
                    logp = torch.log_softmax(logits[:, :-1], dim=-1)
                    tok = logp.gather(-1, inp[:, 1:, None]).squeeze(-1)
                    nll -= float(tok.sum())
                    count += tok.numel()
            out[task.name] = math.exp(nll / count)
        return out


def load_user_evaluator(name: str) -> Callable[..., Mapping[str, float]]:
    """Import ``module:function``; ConfigError when it cannot be found or is not callable."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"user evaluator {name!r} must be written 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"user evaluator {name!r}: cannot import module {module_name!r} ({e})"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(
            f"user evaluator {name!r}: module {module_name!r} has no attribute {attr!r}"
        )
    if not callable(fn):
        raise ConfigError(f"user evaluator {name!r}: {attr!r} is not callable")
    return fn


@dataclass
class SuiteEvaluator:
    """Dispatches each task to the evaluator of its metric (built by :func:`build_evaluator`)."""

    context: EvalContext
    tokenizer: Any = None
    architecture: str | None = None
    _evaluators: dict[str, Evaluator] = field(default_factory=dict)

    def _builtin(self, metric: str) -> Evaluator:
        if metric not in self._evaluators:
            ctx = self.context
            if ctx.model_config is None:
                raise ConfigError(
                    f"metric {metric!r} builds the model from its config.json, but no config was given"
                )
            if metric == "accuracy":
                self._evaluators[metric] = ClassificationEvaluator(
                    ctx.model_config,
                    batch_size=ctx.batch_size,
                    read_bytes=ctx.read_bytes,
                    max_examples=ctx.max_examples,
                    device=ctx.device,
                    architecture=self.architecture,
                )
            elif metric == "lm_eval":
                tokenizer = self.tokenizer if callable(self.tokenizer) else None
                if tokenizer is None:
                    if ctx.model_uri is None:
                        raise ConfigError(
                            "lm_eval tasks need the model's tokenizer: pass the model's HF folder (model_uri)"
                        )
                    tokenizer = load_hf_tokenizer(ctx.model_uri, ctx.read_bytes)
                self._evaluators[metric] = LmEvalEvaluator(
                    ctx.model_config,
                    tokenizer,
                    max_examples=ctx.max_examples,
                    device=ctx.device,
                    architecture=self.architecture,
                )
            else:
                self._evaluators[metric] = PerplexityEvaluator(
                    ctx.model_config,
                    self.tokenizer,
                    batch_size=max(1, ctx.batch_size // 32),
                    read_bytes=ctx.read_bytes,
                    max_examples=ctx.max_examples,
                    device=ctx.device,
                    architecture=self.architecture,
                )
        return self._evaluators[metric]

    def evaluate(
        self, model: TensorReader, heads: Heads, tasks: Sequence[TaskSpec], split: Split
    ) -> dict[str, float]:
        by_metric: dict[str, list[TaskSpec]] = {}
        for t in tasks:
            by_metric.setdefault(t.metric, []).append(t)
        scores: dict[str, float] = {}
        for metric, group in by_metric.items():
            if metric in ("accuracy", "perplexity", "lm_eval"):
                scores.update(self._builtin(metric).evaluate(model, heads, group, split))
                continue
            fn = load_user_evaluator(metric)
            kwargs = (
                {"context": self.context} if "context" in inspect.signature(fn).parameters else {}
            )
            result = fn(model, heads, group, split, **kwargs)
            if not isinstance(result, Mapping):
                raise ConfigError(
                    f"user evaluator {metric!r} returned {type(result).__name__}, expected a mapping task name -> score"
                )
            for t in group:
                if t.name not in result:
                    raise ConfigError(
                        f"user evaluator {metric!r} returned no score for task {t.name!r}"
                    )
                value = result[t.name]
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                ):
                    raise ConfigError(
                        f"user evaluator {metric!r} returned {value!r} for task {t.name!r}; expected a finite number"
                    )
                scores[t.name] = float(value)
        return {t.name: scores[t.name] for t in tasks}


def build_evaluator(
    suite: EvaluationSuite,
    *,
    model_config: Mapping[str, Any] | None,
    read_bytes: ReadBytes | None = None,
    tokenizer: Any = None,
    device: str = "cpu",
    architecture: str | None = None,
    model_uri: str | None = None,
) -> SuiteEvaluator:
    """The evaluator for a lineage's suite.

    ``model_config``: the base's ``config.json`` as a dict (None only when every task uses a
    user evaluator). ``read_bytes``: fetches data URIs (default: local files). ``tokenizer``:
    for perplexity, a ``tokenizers.Tokenizer`` / HF tokenizer (default: ``suite.tokenizer``
    read through ``read_bytes``); for ``lm_eval``, an HF tokenizer (default: the one in
    ``model_uri``). ``device``: where the model runs. ``model_uri``: the scored model's HF
    folder (see :class:`EvalContext`).
    """
    reader = read_bytes or read_local_bytes
    if tokenizer is None and suite.tokenizer is not None:
        tokenizer = load_tokenizer(reader(suite.tokenizer))
    ctx = EvalContext(model_config, reader, device, suite.batch_size, suite.max_examples, model_uri)
    return SuiteEvaluator(ctx, tokenizer=tokenizer, architecture=architecture)
