"""lm-evaluation-harness as an evaluator (``metric: lm_eval``; ``pip install 'mergeflow[lmeval]'``).

The merged model is built from its config and tensors (as for the other built-in metrics,
so it works on any store) and handed to lm-eval's Hugging Face backend (``HFLM``) with the
tokenizer of the model's HF folder; ``lm_eval.simple_evaluate`` then runs the task named
for the split. Scores equal those of ``lm_eval.simple_evaluate(model="hf",
model_args={"pretrained": <the exported folder>})`` on the same task, limit and batch size
(``tests/test_lm_eval.py`` checks it).

Task options (``TaskSpec.options``):

- ``include_path``: a local folder of task YAMLs (tasks with local data files); without it
  only the harness's own tasks are known (and their data must be reachable);
- ``metric`` (default ``acc``) and ``filter`` (default ``none``): which entry of lm-eval's
  results is the score (``"<metric>,<filter>"``);
- ``limit``: examples per task (default: the suite's ``max_examples``, else all);
- ``num_fewshot``; ``batch_size`` (default 8);
- ``higher_is_better``: override the direction guessed from ``metric``.

``data`` names the harness task of each split (``qa_{split}`` or a mapping), because a
harness task brings its own data.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergeflow.errors import ConfigError, MergeflowError
from mergeflow.evaluation.data import ReadBytes, read_local_bytes
from mergeflow.evaluation.models import Heads, ModelCache, head_for
from mergeflow.evaluation.spec import Split, TaskSpec
from mergeflow.merging.tensors import TensorReader

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "config.json",
)
"""Files read from the model's folder to build its tokenizer (those present)."""
DEFAULT_BATCH_SIZE = 8


def _lm_eval() -> Any:
    try:
        # lm-eval: optional extra, only for lm_eval tasks
        import lm_eval
    except ImportError:
        raise ConfigError(
            "metric 'lm_eval' needs lm-evaluation-harness: pip install 'mergeflow[lmeval]'"
        ) from None
    return lm_eval


def load_hf_tokenizer(folder_uri: str, read_bytes: ReadBytes = read_local_bytes) -> Any:
    """A transformers tokenizer from the tokenizer files of an HF folder on any store."""
    # transformers: only for HF tokenizers
    import transformers

    with tempfile.TemporaryDirectory(prefix="mergeflow-tokenizer-") as tmp:
        found = []
        for name in TOKENIZER_FILES:
            try:
                data = read_bytes(f"{folder_uri.rstrip('/')}/{name}")
            except (MergeflowError, OSError):
                continue
            (Path(tmp) / name).write_bytes(data)
            found.append(name)
        if not any(f != "config.json" for f in found):
            raise ConfigError(
                f"lm_eval tasks need the model's tokenizer, but {folder_uri} holds none of {list(TOKENIZER_FILES[:-1])}"
            )
        try:
            return transformers.AutoTokenizer.from_pretrained(tmp)
        except Exception as e:
            raise ConfigError(f"cannot load the tokenizer of {folder_uri}: {e}") from None


def _int_option(task: TaskSpec, key: str, default: int | None) -> int | None:
    value = task.options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"task {task.name!r}: option {key} must be an integer >= 0, got {value!r}"
        )
    return value


class LmEvalEvaluator:
    """Scores ``metric: lm_eval`` tasks with ``lm_eval.simple_evaluate`` (see the module docstring).

    ``model_config``: the model's ``config.json`` (a transformers causal LM);
    ``tokenizer``: a transformers tokenizer (e.g. from :func:`load_hf_tokenizer`).
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        tokenizer: Any,
        *,
        max_examples: int | None = None,
        device: str = "cpu",
        architecture: str | None = None,
    ) -> None:
        self._models = ModelCache(model_config, architecture, device)
        self.tokenizer = tokenizer
        self.max_examples = max_examples
        self.device = device

    def evaluate(
        self, model: TensorReader, heads: Heads, tasks: Sequence[TaskSpec], split: Split
    ) -> dict[str, float]:
        lm_eval = _lm_eval()
        # lm-eval: optional extra
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        out: dict[str, float] = {}
        for task in tasks:
            name = task.data_uri(split)
            key = f"{task.options.get('metric', 'acc')},{task.options.get('filter', 'none')}"
            batch = _int_option(task, "batch_size", DEFAULT_BATCH_SIZE) or DEFAULT_BATCH_SIZE
            include = task.options.get("include_path")
            if include is not None and not Path(str(include)).is_dir():
                raise ConfigError(
                    f"task {task.name!r}: include_path {include!r} is not a local folder of task YAMLs"
                )
            manager = TaskManager(include_path=str(include) if include is not None else None)
            if name not in manager.all_tasks:
                raise ConfigError(
                    f"task {task.name!r}: lm-eval knows no task {name!r}"
                    + (f" (include_path {include})" if include is not None else "")
                )
            module = self._models.get(model, head_for(task, heads))
            lm = HFLM(pretrained=module, tokenizer=self.tokenizer, batch_size=batch)
            logging.getLogger("lm_eval").setLevel(logging.WARNING)
            result = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name],
                num_fewshot=_int_option(task, "num_fewshot", None),
                limit=_int_option(task, "limit", self.max_examples),
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="WARNING",
            )
            scores = (result or {}).get("results", {}).get(name, {})
            value = scores.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                known = sorted(
                    k for k in scores if "," in k and not k.split(",")[0].endswith("_stderr")
                )
                raise ConfigError(
                    f"task {task.name!r}: lm-eval task {name!r} gave no finite {key!r} (it reported {known})"
                )
            out[task.name] = float(value)
        return out
