"""`mergeflow merge` with a pool method (fw_merging, fw_soft, batch_adamerging): calibration data in, one merge out."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.evaluation.calibration import build_objective
from mergeflow.evaluation.spec import EvaluationSuite
from mergeflow.merging.methods import get_pool, validate_params
from mergeflow.merging.methods.base import Objective
from mergeflow.merging.pool import pool_merge
from mergeflow.merging.state import FoldOptions
from mergeflow.storage.checkpoints import OpenedCheckpoint
from mergeflow.storage.schemes import read_uri

CALIBRATION_HELP = (
    "methods that learn (adamerging, fw_merging, fw_soft, batch_adamerging): a YAML or JSON evaluation suite ({tasks: [{name, "
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


def _ids(uri: str) -> set[str]:
    """The names a calibration task may give a checkpoint: its URI as given, or its last component."""
    return {uri, uri.rstrip("/").rsplit("/", 1)[-1]}


HeadReaders = dict[str, Callable[[], dict[str, Any]]]
"""Checkpoint URI or id -> a reader of its head (its tensors the base lacks)."""


def _task_heads(suite: EvaluationSuite, heads_of: HeadReaders, strict: bool) -> dict[str, Any]:
    """Task checkpoint name -> that checkpoint's head, for the tasks whose checkpoint is among
    ``heads_of``; ``strict``: every task must name one of them."""
    out: dict[str, Any] = {}
    for t in suite.tasks:
        if t.checkpoint is None:
            continue
        owner = [uri for uri in heads_of if t.checkpoint in _ids(uri)]
        if owner:
            out[t.checkpoint] = heads_of[owner[0]]()
        elif strict:
            raise ConfigError(
                f"--calibration task {t.name!r} names checkpoint {t.checkpoint!r}, which is not among the CHECKPOINTs"
            )
    return out


def head_of(reader: Any, base_keys: set[str]) -> Callable[[], dict[str, Any]]:
    """A reader of one checkpoint's head."""
    return lambda: {k: reader.get(k) for k in reader.keys() if k not in base_keys}


def require_calibration(args: argparse.Namespace, method: str) -> EvaluationSuite:
    """The ``--calibration`` suite of a method that learns; refused before any work when absent."""
    if not getattr(args, "calibration", None):
        raise ConfigError(f"method {method!r} learns from calibration data: pass --calibration")
    return read_suite(args.calibration)


def fold_objective(
    suite: EvaluationSuite,
    base: OpenedCheckpoint,
    heads_of: HeadReaders,
    params: dict[str, Any],
    device: str,
) -> Objective:
    """One continual fold's objective over the tasks of every checkpoint folded so far and the new one."""
    heads = _task_heads(suite, heads_of, strict=False)
    return build_objective(
        suite,
        base.config or {},
        heads,
        tuple(heads),
        read_bytes=read_uri,
        device=device,
        batch_size=int(params.get("batch_size", 32)),
        seed=int(params.get("seed", 0)),
        loss=params.get("loss", "auto"),
    )


def state_heads(store: Any, manifest: Any) -> HeadReaders:
    """Readers of the heads a state keeps for its folded checkpoints, by checkpoint id."""
    from mergeflow.storage import states

    def reader(cid: str) -> Callable[[], dict[str, Any]]:
        def get() -> dict[str, Any]:
            r = states.heads_reader(store, manifest, cid)
            return {k: r.get(k) for k in r.keys()} if r is not None else {}

        return get

    return {c.id: reader(c.id) for c in manifest.info.checkpoints}


def merge_pool(
    args: argparse.Namespace,
    base: OpenedCheckpoint,
    cks: Sequence[OpenedCheckpoint],
    params: dict[str, Any],
    out: Any,
    device: str,
) -> None:
    """Build the calibration objective over the pool's tasks and run :func:`pool_merge` into ``out``."""
    suite = require_calibration(args, args.method)
    base_keys = set(base.reader.keys())
    heads = _task_heads(suite, {c.uri: head_of(c.reader, base_keys) for c in cks}, strict=True)
    pm = get_pool(args.method)
    o = pm.objective_options(validate_params(pm, params))
    objective = build_objective(
        suite,
        base.config or {},
        heads,
        tuple(heads),
        read_bytes=read_uri,
        device=device,
        batch_size=o.batch_size,
        seed=o.seed,
        loss=o.loss,
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
