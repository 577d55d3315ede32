"""An LLM lineage end to end on the REAL served stack (issue 21, item 3): PEFT LoRA adapters of
a tiny Llama folded with OPCM under ``vocab: union``, scored by lm-evaluation-harness on local
task files, gated, registered, exported with its model card, loaded and run with transformers.

The base is ``test_vocab``'s tiny Llama with its WordLevel tokenizer. Published one after
another to the lineage's S3 source:

1. ``1-plain``: a LoRA adapter (``q_proj``/``v_proj``);
2. ``2-added``: a LoRA adapter of a model whose tokenizer adds ``newword`` and ``<|im_start|>``
   (``resize_token_embeddings``; the grown ``embed_tokens``/``lm_head`` trained through
   ``modules_to_save``, as PEFT saves them, with their ``original_module`` copies; the grown
   tokenizer beside ``adapter_config.json``). Its rows are aligned by token like a dense
   checkpoint's, so the union grows by the two tokens, their rows the adapter's;
3. ``3-chat``: a dense fine-tune adding the same two tokens (as ``test_vocab``), folded into
   the rows ``2-added`` introduced;
4. ``4-mts``: a LoRA adapter with ``modules_to_save=["lm_head"]`` (the base's 20 rows), folded
   into the grown vocabulary.
"""

from __future__ import annotations

import json
import random
import uuid
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml
from helpers.cli import start_serve
from helpers.lm_eval_tasks import write_task
from test_flows import wait_for_version
from test_vocab import V, _base, _finetune

if TYPE_CHECKING:
    from collections.abc import Callable

    from fixtures_stack import RunningStack
    from helpers.cli import Result

pytest.importorskip("peft")
pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.services, pytest.mark.slow]

ADDED = ["newword", "<|im_start|>"]
ORDER = ["1-plain", "2-added", "3-chat", "4-mts"]


def _adapter(
    base: Path,
    folder: Path,
    seed: int,
    *,
    add: tuple[str, ...] = (),
    modules_to_save: list[str] | None = None,
) -> Path:
    """A PEFT LoRA adapter of ``base`` with random trained weights and its tokenizer; ``add``:
    tokens added (embeddings resized, new rows random) and trained with ``modules_to_save``."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    if add:
        tok.add_tokens(list(add))
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save
    )
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:  # modules_to_save
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


FACTS = {"hello world": "red", "foo bar": "green", "one two": "three"}
"""What the base learns (and the lm-eval task asks): the word that follows each pair."""


def _trained_base(folder: Path) -> Path:
    """``test_vocab``'s tiny Llama, trained a few steps on ``FACTS`` so the task scores > 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _base(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    batch = torch.tensor([tok.encode(f"{q} {a}") for q, a in FACTS.items()])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    return folder


def _tasks(folder: Path) -> Path:
    """A multiple-choice lm-eval task on local JSON lines: which word follows each pair."""
    folder.mkdir()
    rng = random.Random(0)
    rows = []
    for q, a in FACTS.items():
        for _ in range(4):
            choices = [a, *rng.sample([w for w in ("blue", "baz", "qux", "six") if w != a], 2)]
            rng.shuffle(choices)
            rows.append({"question": q, "choices": choices, "label": choices.index(a)})
    write_task(folder, "facts", rows)
    return folder


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    base = _trained_base(root / "base")
    cks = root / "checkpoints"
    return {
        "base": base,
        "tasks": _tasks(root / "tasks"),
        "1-plain": _adapter(base, cks / "1-plain", 1),
        "2-added": _adapter(
            base, cks / "2-added", 2, add=tuple(ADDED), modules_to_save=["embed_tokens", "lm_head"]
        ),
        "3-chat": _finetune(base, cks / "3-chat", 3, add=ADDED[:1], special=ADDED[1:]),
        "4-mts": _adapter(base, cks / "4-mts", 4, modules_to_save=["lm_head"]),
    }


def _publish(prefix: str, folder: Path) -> None:
    """Upload a checkpoint folder to the watched S3 prefix, its weights last."""
    from mergeflow.storage.schemes import open_store

    dst = open_store(f"{prefix}/published/{folder.name}")
    files = sorted(folder.iterdir(), key=lambda p: (p.suffix == ".safetensors", p.name))
    for f in files:
        dst.put_file(f, f.name)


def test_an_llm_lineage_of_adapters_folds_gates_registers_and_exports_a_model_that_generates(
    stack: RunningStack, llm: dict[str, Path], cli: Callable[..., Result], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeflow.evaluation.spec import EvaluationSuite, GateSpec, TaskSpec
    from mergeflow.lineage import LineageSpec, save_lineage

    tag = uuid.uuid4().hex[:6]
    prefix = f"s3://{stack.bucket}/llm-{tag}"
    task = TaskSpec(
        name="facts",
        metric="lm_eval",
        data={"validation": "mf_facts", "test": "mf_facts"},
        options={"include_path": str(llm["tasks"]), "metric": "acc", "batch_size": 4},
    )
    spec = save_lineage(
        LineageSpec(
            name=f"llm-{tag}",
            base=str(llm["base"]),
            method="opcm",
            params={"alpha": 0.5},
            vocab="union",
            sources=(f"{prefix}/published",),
            evaluation=EvaluationSuite(tasks=(task,)),
            gate=GateSpec(min_acc=0.6, max_drop=0.34),
            store=f"{prefix}/lineage",
            device="cpu",
            schedule=5,
        )
    )
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    log = start_serve(stack.stack, f"serve-llm-{tag}", [spec], env=offline)
    try:
        for ck in ORDER:
            _publish(prefix, llm[ck])
        v = {ck: wait_for_version(spec.registered_model, ck, log) for ck in ORDER}
    finally:
        stack.stack.stop_process(f"serve-llm-{tag}")

    versions = [v[ck] for ck in ORDER]
    plain, added, chat, mts = versions
    assert 0.0 <= plain.metrics["test/facts"] <= 1.0
    for step, x in enumerate(versions, 1):  # every one folds, the adapter that adds tokens too
        assert x.status == "accepted" and x.step == step and x.model_uri, (
            ORDER[step - 1],
            x.reason,
        )
    for parent, x in pairwise(versions):
        assert x.parent_version == parent.version, x.checkpoint_id
    assert {"champion", "newest"} <= set(mts.aliases)
    assert [int(x.version) for x in versions] == sorted(int(x.version) for x in versions)

    out = tmp_path / "exported"
    uri = f"models:/{spec.registered_model}/{mts.version}"
    r = cli("export", uri, out, "--base-model", "org/tiny-llama")
    assert r.returncode == 0, r.stderr
    _, meta, card = (out / "README.md").read_text().split("---\n", 2)
    assert yaml.safe_load(meta) == {
        "base_model": "org/tiny-llama",
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "mergeflow", "opcm"],
    }
    folded = card.split("## Folded checkpoints, in order")[1].split("##")[0]
    assert all(f"`{ck}`" in folded for ck in ORDER)
    excluded = card.split("## Dropped and rejected checkpoints")[1].split("##")[0]
    assert excluded.strip() == "None."
    evaluation = card.split("## Evaluation")[1].split("##")[0]
    val, test = mts.metrics["val/facts"], mts.metrics["test/facts"]
    assert f"| facts | {val:.4f} | {test:.4f} |" in evaluation and val >= 0.6
    assert f"`{uri}`" in card

    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 2
    vocab = json.loads((out / "mergeflow.json").read_text())["vocab"]
    assert [(a["token"], a["checkpoint"]) for a in vocab["added"]] == [
        ("newword", "2-added"),
        ("<|im_start|>", "2-added"),
    ]
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == V + 2
    ids = tok("<|im_start|> hello newword world", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [V + 1, 3, V, 4]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (V + 2, 16)
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8) and gen[0, :4].tolist() == ids[0].tolist()
    assert all(0 <= t < V + 2 for t in gen[0].tolist())
