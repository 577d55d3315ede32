"""What an example suite builder returns, and the file helpers the builders share."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergeflow.evaluation.spec import CALIBRATION, SPLITS, EvaluationSuite, TaskSpec


@dataclass(frozen=True)
class SuiteFiles:
    """Paths of a built example suite.

    ``base``: HF folder without task heads; ``checkpoints``: one HF folder per task, in
    publication order, each with its own head; ``data[task][split]``: the labelled ``.npz``
    of the validation, test and calibration splits. The train split stays private to the
    builder; ``calibration`` is a fixed subset of it, for data-informed merging methods.
    """

    root: Path
    base: Path
    checkpoints: tuple[Path, ...]
    task_names: tuple[str, ...]
    data: dict[str, dict[str, Path]]

    @classmethod
    def from_manifest(cls, root: Path, manifest: dict[str, Any]) -> SuiteFiles:
        names = tuple(manifest["task_names"])
        root = root.resolve()
        return cls(
            root=root,
            base=root / "base",
            checkpoints=tuple(root / "checkpoints" / c for c in manifest["checkpoints"]),
            task_names=names,
            data={
                n: {s: root / "data" / n / f"{s}.npz" for s in (*SPLITS, CALIBRATION)}
                for n in names
            },
        )

    @property
    def checkpoint_ids(self) -> tuple[str, ...]:
        """Default checkpoint ids: the checkpoint folder names (``01-rot90`` ...)."""
        return tuple(p.name for p in self.checkpoints)

    def evaluation_suite(
        self, checkpoint_ids: Sequence[str] | None = None, batch_size: int = 512
    ) -> EvaluationSuite:
        """An :class:`EvaluationSuite` scoring each task with the head of its checkpoint.

        ``checkpoint_ids``: the ids the pipeline's source gives the checkpoints, in the same
        order as ``checkpoints`` (default: the folder names).
        """
        ids = list(checkpoint_ids) if checkpoint_ids is not None else list(self.checkpoint_ids)
        if len(ids) != len(self.checkpoints):
            raise ValueError(f"need {len(self.checkpoints)} checkpoint ids, got {len(ids)}")
        tasks = [
            TaskSpec(
                name=name,
                checkpoint=cid,
                data=str(self.root / "data" / name / "{split}.npz"),
                metric="accuracy",
            )
            for name, cid in zip(self.task_names, ids, strict=True)
        ]
        return EvaluationSuite(tasks=tuple(tasks), batch_size=batch_size)


def matching_manifest(root: Path, key: dict[str, Any], reuse: bool) -> dict[str, Any] | None:
    """``root``'s suite.json when it was built with these arguments, else None after clearing ``root``."""
    try:
        manifest = json.loads((root / "suite.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if reuse and manifest is not None and all(manifest.get(k) == v for k, v in key.items()):
        return dict(manifest)
    for sub in ("base", "checkpoints", "data", "suite.json"):
        p = root / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return None


def reuse_or_clear(root: Path, key: dict[str, Any], reuse: bool) -> SuiteFiles | None:
    """The suite already built in ``root`` with these arguments, else None after clearing ``root``."""
    manifest = matching_manifest(root, key, reuse)
    return None if manifest is None else SuiteFiles.from_manifest(root, manifest)


def save_tensors(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one HF-layout folder: config.json + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
