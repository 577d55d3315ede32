"""`mergeflow merge` with a pool method (fw_merging, batch_adamerging): calibration data in, one merge out."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.evaluation.calibration import build_objective
from mergeflow.evaluation.spec import EvaluationSuite
from mergeflow.merging.pool import pool_merge
from mergeflow.merging.state import FoldOptions
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.schemes import read_uri

CALIBRATION_HELP = (
    "pool methods (fw_merging, batch_adamerging): a YAML or JSON evaluation suite ({tasks: [{name, "
    "checkpoint, data}]}) whose tasks name a calibration split; a task's checkpoint is a CHECKPOINT "
    "as given or its last path component"
)


def read_suite(path: str) -> EvaluationSuite:
    """The ``--calibration`` file as an :class:`EvaluationSuite` (one message for any problem);
    YAML needs the pipeline extra's pyyaml, JSON reads with the light install."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--calibration {path}: {e.strerror or e}") from None
    try:
        import yaml

        raw = yaml.safe_load(text)
    except ImportError:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--calibration {path} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"--calibration {path} is not valid YAML or JSON: {e}") from None
    if isinstance(raw, dict) and "evaluation" in raw:
        raw = raw["evaluation"]
    try:
        return EvaluationSuite.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"--calibration {path}: {problems}") from None


def _ids(c: OpenedCheckpoint) -> set[str]:
    return {c.uri, c.uri.rstrip("/").rsplit("/", 1)[-1]}


def merge_pool(
    args: argparse.Namespace,
    base: OpenedCheckpoint,
    cks: Sequence[OpenedCheckpoint],
    params: dict[str, Any],
    out: Any,
    device: str,
) -> None:
    """Build the calibration objective over the pool's tasks and run :func:`pool_merge` into ``out``."""
    if not args.calibration:
        raise ConfigError(
            f"method {args.method!r} learns from calibration data: pass --calibration"
        )
    suite = read_suite(args.calibration)
    heads: dict[str, dict[str, Any]] = {}
    base_keys = set(base.reader.keys())
    for t in suite.tasks:
        if t.checkpoint is None:
            continue
        owner = [c for c in cks if t.checkpoint in _ids(c)]
        if not owner:
            raise ConfigError(
                f"--calibration task {t.name!r} names checkpoint {t.checkpoint!r}, which is not among the CHECKPOINTs"
            )
        r = owner[0].reader
        heads[t.checkpoint] = {k: r.get(k) for k in r.keys() if k not in base_keys}
    p = dict(params)
    objective = build_objective(
        suite,
        base.config or {},
        heads,
        tuple(heads),
        read_bytes=read_uri,
        device=device,
        batch_size=int(p.get("examples", p.get("batch_size", 32))),
        seed=int(p.get("seed", 0)),
        loss=p.get("loss", "cross_entropy" if args.method == "fw_merging" else "auto"),
    )
    options = FoldOptions(
        compute_dtype=args.compute_dtype, missing="zero" if args.allow_missing else "error"
    )
    pool_merge(
        args.method,
        params,
        base.reader,
        [c.reader for c in cks],
        out,
        objective,
        options=options,
        dtype=args.dtype,
        device=device,
        log=None if getattr(args, "no_progress", False) else _say,
        names=[c.uri for c in cks],
    )


def _say(message: str) -> None:
    import sys

    print(f"mergeflow: {message}", file=sys.stderr, flush=True)
