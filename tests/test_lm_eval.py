"""lm-evaluation-harness as an evaluator: a small causal LM saved with transformers, local tasks.

The model is a tiny GPT-2 trained for a few seconds on sums of digits, with a word-level
tokenizer built here with ``tokenizers``; the tasks are lm-eval task YAMLs whose data are
local JSON-lines files. The evaluator's score must equal ``lm_eval.simple_evaluate`` run
directly on the saved folder (``model="hf"``), for a higher-is-better metric (``acc`` of a
multiple-choice task) and a lower-is-better one (``word_perplexity`` of a rolling task).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.lm_eval_tasks import write_task
from safetensors.torch import load_file

from mergeflow.errors import ConfigError
from mergeflow.evaluation import EvaluationSuite, TaskSpec, build_evaluator
from mergeflow.merging.tensors import DictReader

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

WORDS = [str(i) for i in range(19)] + ["+", "="]
LIMIT = 24
BATCH = 4


def _sums(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<eos>",
        bos_token="<eos>",
        pad_token="<eos>",
    )


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 (saved with save_pretrained) briefly trained on 'a + b = c', and two local tasks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("lm")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        batch = [f"<eos> {a} + {b} = {a + b}" for a, b in _sums(rng, 32)]
        ids = torch.tensor([tokenizer.encode(t) for t in batch])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = root / "model"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)

    tasks = root / "tasks"
    tasks.mkdir()
    rows = []
    for a, b in _sums(random.Random(1), 40):
        wrong = sorted({(a + b + d) % 19 for d in (3, 7, 11)} - {a + b})[:2]
        choices = [str(a + b), *map(str, wrong)]
        random.Random(a * 19 + b).shuffle(choices)
        rows.append(
            {"question": f"{a} + {b} =", "choices": choices, "label": choices.index(str(a + b))}
        )
    write_task(tasks, "sums", rows)
    text = [{"text": f"{a} + {b} = {a + b}"} for a, b in _sums(random.Random(2), 30)]
    write_task(tasks, "text", text, multiple_choice=False)
    return {"model": folder, "tasks": tasks}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def _direct(lm: dict[str, Path], task: str, key: str) -> float:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(lm["model"]), "device": "cpu", "dtype": "float32"},
        tasks=[task],
        batch_size=BATCH,
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(lm["tasks"])),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert out is not None
    return float(out["results"][task][key])


def _suite(lm: dict[str, Path], task: str, metric: str, **options: Any) -> EvaluationSuite:
    return EvaluationSuite(
        tasks=(
            TaskSpec(
                name="lm",
                metric="lm_eval",
                data={"validation": task, "test": task},
                options={
                    "include_path": str(lm["tasks"]),
                    "metric": metric,
                    "limit": LIMIT,
                    "batch_size": BATCH,
                    **options,
                },
            ),
        )
    )


def _score(lm: dict[str, Path], suite: EvaluationSuite, split: str = "test") -> dict[str, float]:
    folder = lm["model"]
    config = json.loads((folder / "config.json").read_text())
    reader = DictReader(load_file(str(folder / "model.safetensors")), str(folder))
    ev = build_evaluator(suite, model_config=config, model_uri=str(folder))
    return ev.evaluate(reader, {}, list(suite.tasks), split)  # type: ignore[arg-type]


def test_accuracy_matches_lm_eval_run_directly(lm: dict[str, Path]) -> None:
    suite = _suite(lm, "mf_sums", "acc")
    assert suite.higher_is_better
    got = _score(lm, suite)
    expected = _direct(lm, "mf_sums", "acc,none")
    assert got == {"lm": pytest.approx(expected, abs=1e-12)}
    assert got["lm"] > 1 / 3 + 0.1  # the trained model beats chance: a real score, not a constant
    assert _score(lm, suite, "validation") == got  # the same harness task named for both splits


def test_perplexity_matches_lm_eval_run_directly_and_is_lower_is_better(
    lm: dict[str, Path],
) -> None:
    suite = _suite(lm, "mf_text", "word_perplexity")
    assert not suite.higher_is_better
    got = _score(lm, suite)
    expected = _direct(lm, "mf_text", "word_perplexity,none")
    assert got == {"lm": pytest.approx(expected, rel=1e-9)}
    assert 1.0 < got["lm"] < len(WORDS)


def test_bad_inputs_name_the_problem(lm: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lm-eval knows no task 'nope'"):
        _score(lm, _suite(lm, "nope", "acc"))
    with pytest.raises(
        ConfigError, match=r"gave no finite 'f1,none' \(it reported \['acc,none'\]\)"
    ):
        _score(lm, _suite(lm, "mf_sums", "f1"))
    with pytest.raises(ConfigError, match="include_path .* is not a local folder of task YAMLs"):
        _score(lm, _suite(lm, "mf_sums", "acc", include_path=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match="option limit must be an integer >= 0"):
        _score(lm, _suite(lm, "mf_sums", "acc", limit=-1))
    empty = tmp_path / "empty"
    empty.mkdir()
    suite = _suite(lm, "mf_sums", "acc")
    config = json.loads((lm["model"] / "config.json").read_text())
    reader = DictReader(load_file(str(lm["model"] / "model.safetensors")))
    with pytest.raises(
        ConfigError, match="lm_eval tasks need the model's tokenizer, but .* holds none"
    ):
        build_evaluator(suite, model_config=config, model_uri=str(empty)).evaluate(
            reader, {}, list(suite.tasks), "test"
        )
    with pytest.raises(ConfigError, match="pass the model's HF folder"):
        build_evaluator(suite, model_config=config).evaluate(reader, {}, list(suite.tasks), "test")


def test_direction_of_lm_eval_metrics() -> None:
    def spec(**options: Any) -> TaskSpec:
        return TaskSpec(name="t", metric="lm_eval", data="t_{split}", options=options)

    assert spec().higher_is_better  # acc
    assert spec(metric="acc_norm").higher_is_better
    assert not spec(metric="word_perplexity").higher_is_better
    assert not spec(metric="bits_per_byte").higher_is_better
    assert not spec(metric="acc", higher_is_better=False).higher_is_better
    assert spec().data_uri("validation") == "t_validation"
