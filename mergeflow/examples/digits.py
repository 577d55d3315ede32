"""The digits suite: a tiny HF ViT pretrained on real sklearn digits, plus fine-tuned task checkpoints.

Everything is real data (``sklearn.datasets.load_digits``, 1797 8x8 grey images) and real
training (full fine-tuning with Adam on CPU, seeded). The images are shuffled once and split
into a *pretraining* part, used only to train the base, and a *task* part that every task
splits the same way into disjoint train / validation / test sets. Each task applies its own
transform to the images and/or its own labelling, so each fine-tune moves the backbone in a
different direction (the conflict a merging method has to resolve).

Layout written under ``out_dir`` (HF layout, one folder per checkpoint, ready to publish)::

    base/config.json, base/model.safetensors          backbone only: no ``classifier.*``
    checkpoints/01-rot90/config.json, model.safetensors  backbone + its own ``classifier.*``
    ...
    data/rot90/validation.npz, data/rot90/test.npz     ``pixel_values`` (N,1,8,8) f32, ``labels`` i64
    data/rot90/calibration.npz                         the same, the first ``n_calibration`` train images
    suite.json                                         manifest (reused when it matches)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergeflow.examples.suite import SuiteFiles, reuse_or_clear, save_tensors

SUITE_FORMAT = "mergeflow.digits/1"


@dataclass(frozen=True)
class DigitsTask:
    """One task: an image transform and a labelling of the digit."""

    name: str
    num_labels: int
    transform: Callable[[np.ndarray], np.ndarray]
    label: Callable[[np.ndarray], np.ndarray]


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="constant")
    h, w = x.shape[-2:]
    acc = np.zeros_like(x, dtype=np.float64)
    for i in range(3):
        for j in range(3):
            acc += p[..., i : i + h, j : j + w]
    return acc / 9.0


def _digit(y: np.ndarray) -> np.ndarray:
    return y


TASKS: tuple[DigitsTask, ...] = (
    DigitsTask("rot90", 10, lambda x: np.rot90(x, 1, axes=(-2, -1)), _digit),
    DigitsTask("flip_lr", 10, lambda x: x[..., ::-1], _digit),
    DigitsTask("invert", 10, lambda x: 1.0 - x, _digit),
    DigitsTask("parity", 2, lambda x: x, lambda y: y % 2),
    DigitsTask("shift_mod3", 3, lambda x: _shift(x, 2, 2), lambda y: y % 3),
    DigitsTask("transpose", 10, lambda x: np.swapaxes(x, -2, -1), _digit),
    DigitsTask("blur_ge5", 2, _blur, lambda y: (y >= 5).astype(np.int64)),
    DigitsTask("flip_ud_mod4", 4, lambda x: x[..., ::-1, :], lambda y: y % 4),
)
"""The 8 tasks, in the default publication order."""

task_names: list[str] = [t.name for t in TASKS]

MAX_TASKS = len(TASKS)
PRETRAIN_N = 700
"""Images used only to pretrain the base; the other 1097 form the task splits."""
TRAIN_N, VAL_N = 600, 200
"""Per-task split sizes; test gets the remaining 297."""


DigitsSuite = SuiteFiles
"""Paths of a built digits suite (see the module docstring for the layout)."""


def vit_config(num_labels: int = 10) -> dict:
    """The tiny ViT's HF config: 8x8 single channel, patch 2, hidden 64, 2 layers."""
    # heavy: only when the suite is built
    from transformers import ViTConfig

    cfg = ViTConfig(  # type: ignore[call-arg]  # num_labels is a PretrainedConfig kwarg
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        architectures=["ViTForImageClassification"],
    )
    return cfg.to_dict()


def _model(config: dict) -> torch.nn.Module:
    # heavy: only when the suite is built
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig.from_dict({k: v for k, v in config.items() if k != "transformers_version"})
    return ViTForImageClassification(cfg)


def _train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = 64,
) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            out = model(pixel_values=x[idx]).logits
            loss = torch.nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def build_digits_suite(
    out_dir: str | Path,
    n_tasks: int = 6,
    seed: int = 0,
    *,
    pretrain_epochs: int = 30,
    finetune_epochs: int = 8,
    n_calibration: int = 64,
    reuse: bool = True,
    log: Callable[[str], None] | None = None,
) -> DigitsSuite:
    """Pretrain the base and fine-tune ``n_tasks`` checkpoints (the first ``n_tasks`` of TASKS).

    Seeded and deterministic on one machine. When ``out_dir`` already holds a suite built
    with the same arguments it is reused (``reuse=False`` rebuilds). N=6 takes about a
    minute on 2 CPU cores. Each task's ``calibration.npz`` holds the first ``n_calibration``
    examples of its train split (data-informed merging methods learn from it; it never
    overlaps validation or test). Returns the paths (see :class:`DigitsSuite`).
    """
    # heavy: only when the suite is built
    from sklearn.datasets import load_digits

    if not 1 <= n_tasks <= MAX_TASKS:
        raise ValueError(f"n_tasks must be between 1 and {MAX_TASKS}, got {n_tasks}")
    if not 1 <= n_calibration <= TRAIN_N:
        raise ValueError(f"n_calibration must be between 1 and {TRAIN_N}, got {n_calibration}")
    root = Path(out_dir)
    key = {
        "format": SUITE_FORMAT,
        "n_tasks": n_tasks,
        "seed": seed,
        "pretrain_epochs": pretrain_epochs,
        "finetune_epochs": finetune_epochs,
        "n_calibration": n_calibration,
    }
    built = reuse_or_clear(root, key, reuse)
    if built is not None:
        return built
    say = log or (lambda _m: None)

    torch.manual_seed(seed)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(images))
    pre, rest = perm[:PRETRAIN_N], perm[PRETRAIN_N:]
    splits = {
        "train": rest[:TRAIN_N],
        "validation": rest[TRAIN_N : TRAIN_N + VAL_N],
        "test": rest[TRAIN_N + VAL_N :],
    }
    splits["calibration"] = splits["train"][
        :n_calibration
    ]  # a fixed subset of train: no extra draw

    def tensors(idx: np.ndarray, task: DigitsTask | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images[idx], labels[idx]
        if task is not None:
            x, y = task.transform(x), task.label(y)
        return torch.from_numpy(
            np.ascontiguousarray(x, dtype=np.float32)[:, None]
        ), torch.from_numpy(np.asarray(y, dtype=np.int64))

    base_cfg = vit_config(10)
    model = _model(base_cfg)
    xp, yp = tensors(pre, None)
    _train(model, xp, yp, epochs=pretrain_epochs, lr=2e-3, seed=seed)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in base_sd.items() if not k.startswith("classifier.")}
    save_tensors(root / "base", base_cfg, backbone)
    xv, yv = tensors(splits["validation"], None)
    say(
        f"base: pretrained on {PRETRAIN_N} digits, plain-digit validation accuracy {_accuracy(model, xv, yv):.3f}"
    )

    folders: list[str] = []
    scores: dict[str, float] = {}
    for i, task in enumerate(TASKS[:n_tasks]):
        cfg = vit_config(task.num_labels)
        m = _model(cfg)
        sd = dict(backbone)
        sd.update({k: v for k, v in m.state_dict().items() if k.startswith("classifier.")})
        m.load_state_dict(sd)
        xt, yt = tensors(splits["train"], task)
        _train(m, xt, yt, epochs=finetune_epochs, lr=1e-3, seed=seed * 1000 + i + 1)
        folder = f"{i + 1:02d}-{task.name}"
        save_tensors(root / "checkpoints" / folder, cfg, m.state_dict())
        folders.append(folder)
        for split in ("validation", "test", "calibration"):
            x, y = tensors(splits[split], task)
            d = root / "data" / task.name
            d.mkdir(parents=True, exist_ok=True)
            np.savez(d / f"{split}.npz", pixel_values=x.numpy(), labels=y.numpy())
        xv, yv = tensors(splits["validation"], task)
        scores[task.name] = _accuracy(m, xv, yv)
        say(f"checkpoint {folder}: fine-tuned, validation accuracy {scores[task.name]:.3f}")

    manifest = dict(
        key,
        task_names=[t.name for t in TASKS[:n_tasks]],
        checkpoints=folders,
        finetuned_validation=scores,
    )
    (root / "suite.json").write_text(json.dumps(manifest, indent=2))
    return SuiteFiles.from_manifest(root, manifest)
