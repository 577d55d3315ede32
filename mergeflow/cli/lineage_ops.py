"""History and publishing commands: `lineage drop|resume|branch|rebuild`, `export`, `publish`.

A lineage's versions are a history of merges that can be edited, forked and published:

- ``lineage drop NAME CHECKPOINT --reason TEXT``: mark the checkpoint dropped and replay every
  fold after it from the state before it (flow ``mergeflow-replay``); ``lineage resume NAME``
  finishes an interrupted replay;
- ``lineage branch NAME --at VERSION --as NEW``: a new lineage continuing that version's state;
- ``lineage rebuild NAME --as NEW --method M``: refold the same checkpoints with another method
  (a pool method merges them as one pool);
- ``export models:/NAME@ALIAS OUT`` and ``publish NAME --to hf://org/repo``: the merged model as a
  Hugging Face folder with its model card, on disk or on the Hub.

Only argparse is imported at module level (the light CLI loads this module).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeflow.cli.stackenv import use_stack_env
from mergeflow.errors import ConfigError

if TYPE_CHECKING:
    from mergeflow.lineage import LineageSpec
    from mergeflow.storage.registry import VersionRecord


def register_lineage(ls: Any) -> None:
    """Add `drop`, `resume`, `branch` and `rebuild` to the `mergeflow lineage` actions."""
    p = ls.add_parser(
        "drop",
        help="drop a folded checkpoint and replay every fold after it without it",
        description=(
            "Mark CHECKPOINT (its id, digest or URI) dropped with the reason: it is never folded again. Every "
            "fold that built on it is replayed in its original order, from the state of the step before it, "
            "and registered as a new version tagged with the version it replaces; champion moves. Runs the "
            "mergeflow-replay flow here, under the lineage's fold lock. Running it again resumes an "
            "interrupted replay."
        ),
    )
    p.add_argument("name")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded on the version)")
    p.set_defaults(func=cmd_drop)
    p = ls.add_parser("resume", help="finish an interrupted replay (after `lineage drop`)")
    p.add_argument("name")
    p.set_defaults(func=cmd_resume)

    p = ls.add_parser(
        "branch",
        help="start a new lineage from a version's state",
        description=(
            "Create lineage NEW that continues the state of NAME's VERSION (a number or an alias), with the same "
            "sources, suite and gate unless told otherwise. Its first fold is gated against that version's "
            "scores; checkpoints NAME had seen up to VERSION are never offered to it. NAME is not changed. The "
            "method cannot change (see `lineage rebuild`)."
        ),
    )
    p.add_argument("name")
    p.add_argument("--at", required=True, metavar="VERSION", help="version number or alias")
    p.add_argument("--as", dest="new", required=True, metavar="NEW", help="the new lineage's name")
    _derive_options(p)
    p.add_argument("--method", help=argparse.SUPPRESS)  # refused with a pointer to rebuild
    p.set_defaults(func=cmd_branch)

    p = ls.add_parser(
        "rebuild",
        help="refold a lineage's checkpoints, in the same order, with another method (or merge them as a pool)",
        description=(
            "Create lineage NEW with METHOD and refold into it, in their original order, the checkpoints NAME "
            "folded (dropped and validation-rejected ones excluded), under NEW's lock (flow mergeflow-rebuild). "
            "A pool METHOD (fw_merging, fw_soft, batch_adamerging) merges them all at once instead, on the calibration "
            "split of each one's task, as NEW's first version; each later checkpoint is merged with NEW's "
            "accepted pool again. Running it again resumes an interrupted rebuild."
        ),
    )
    p.add_argument("name")
    p.add_argument("--as", dest="new", required=True, metavar="NEW")
    p.add_argument("--method", required=True, metavar="M")
    _derive_options(p)
    p.set_defaults(func=cmd_rebuild)


def register(subparsers: Any) -> None:
    """Add `export` and `publish` to the `mergeflow` sub-commands."""
    p = subparsers.add_parser(
        "export",
        help="write a registered merged model as a Hugging Face folder with its model card",
        description=(
            "Copy the merged weights of MODEL_URI (models:/NAME@ALIAS, models:/NAME/VERSION or mlflow://models/...) "
            "to OUT with a model card (README.md: base_model, base_model_relation: merge, license, tags; method, "
            "folded checkpoints, dropped and rejected ones, evaluation, MLflow provenance). The same card is "
            "logged to the version's MLflow artifacts."
        ),
    )
    p.add_argument("model_uri", metavar="MODEL_URI")
    p.add_argument("out", metavar="OUT")
    _card_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "publish",
        help="upload a lineage's merged model to a Hugging Face Hub repo in one commit",
        description=(
            "Export the lineage's version (alias champion by default) with its card and upload it to the Hub "
            "model repo (created if missing) in one commit. Uses HF_TOKEN and HF_ENDPOINT."
        ),
    )
    p.add_argument("name", help="the lineage")
    p.add_argument("--to", required=True, metavar="hf://ORG/REPO")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="alias to publish (default champion)")
    which.add_argument("--version", help="version number to publish")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="commit message")
    _card_options(p)
    p.set_defaults(func=cmd_publish)


def _derive_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)"
    )
    p.add_argument(
        "--source", action="append", metavar="URI", help="watch these sources instead (repeatable)"
    )
    p.add_argument("--store", help="where NEW keeps its states (default: NEW beside NAME's store)")


def _card_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-model",
        metavar="ORG/REPO",
        help="the base's Hub id for the card (default: from an hf:// base)",
    )


def _params(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs with YAML-typed values (``0.5`` is a number, ``true`` a boolean)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            out[key.strip()] = value.strip()
    return out


def format_history(spec: LineageSpec, versions: Sequence[VersionRecord]) -> str:
    """Lines on where the lineage came from and how its history was edited ("" if untouched)."""
    lines = []
    if spec.origin is not None:
        lines.append(
            f"{spec.origin.kind} of {spec.origin.lineage} at version {spec.origin.version}"
        )
    lines += [f"version {v.version} ({v.checkpoint_id}): {v.note}" for v in versions if v.note]
    return "".join(f"\n{line}" for line in ["history:", *lines]) + "\n" if lines else ""


def _print_steps(steps: Sequence[Any]) -> None:
    for s in steps:
        o = s.outcome
        print(
            f"version {s.replaced} -> {o.version}\t{o.checkpoint_id}\t{o.status}"
            f"{chr(9) + o.reason if o.reason else ''}"
        )


def _print_aliases(spec: LineageSpec) -> None:
    from mergeflow.storage.registry import Registry

    champion = Registry().champion(spec.registered_model)
    print(f"champion: {f'version {champion.version}' if champion else '-'}")


def cmd_drop(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.replay import replay_flow
    from mergeflow.lineage import load_lineage

    use_stack_env()
    spec = load_lineage(args.name)
    steps = replay_flow(args.name, args.checkpoint, args.reason)
    _print_steps(steps)
    print(f"dropped {args.checkpoint} from {args.name}; replayed {len(steps)} fold(s)")
    _print_aliases(spec)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.replay import replay_flow
    from mergeflow.lineage import load_lineage

    use_stack_env()
    spec = load_lineage(args.name)
    steps = replay_flow(args.name)
    _print_steps(steps)
    print(f"{args.name}: {len(steps)} replayed fold(s) finished" if steps else "nothing to resume")
    _print_aliases(spec)
    return 0


def _check_store(spec: LineageSpec) -> None:
    """Refuse a store that already holds a lineage."""
    from mergeflow.lineage import SPEC_FILE
    from mergeflow.storage.schemes import open_store

    if open_store(spec.store).exists(SPEC_FILE):
        raise ConfigError(f"{spec.store} already holds a lineage; give NEW its own --store")


def cmd_branch(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.lineage import derive_lineage, load_lineage, save_lineage
    from mergeflow.storage.registry import Registry
    from mergeflow.tasks.replay import resolve_version, start_branch

    use_stack_env()
    origin = load_lineage(args.name)
    at = resolve_version(Registry().versions(origin.registered_model), args.at)
    spec = derive_lineage(
        origin,
        "branch",
        args.new,
        at.version,
        method=args.method,
        params=_params(args.param),
        sources=tuple(args.source or ()),
        store=args.store,
    )
    _check_store(spec)
    start_branch.fn(origin, at.version, spec)
    save_lineage(spec)
    print(
        f"lineage {spec.name}: branch of {origin.name} at version {at.version} (step {at.step}), "
        f"{spec.method} {spec.params}, store {spec.store}"
    )
    print("restart `mergeflow serve` to schedule its watch")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.replay import rebuild_flow
    from mergeflow.lineage import derive_lineage, find_lineage, load_lineage, save_lineage
    from mergeflow.storage.registry import Registry

    use_stack_env()
    origin = load_lineage(args.name)
    existing = find_lineage(args.new)
    o = existing.origin if existing is not None else None
    if (
        existing is not None
        and o
        and (o.kind, o.lineage, existing.method)
        == (
            "rebuild",
            origin.name,
            args.method,
        )
    ):
        spec = existing  # an interrupted rebuild: resume it
    else:
        versions = Registry().versions(origin.registered_model)
        if not versions:
            raise ConfigError(f"lineage {origin.name} has no versions to rebuild")
        newest = str(max(int(v.version) for v in versions))
        spec = derive_lineage(
            origin,
            "rebuild",
            args.new,
            newest,
            method=args.method,
            params=_params(args.param),
            sources=tuple(args.source or ()),
            store=args.store,
        )
        _check_store(spec)
        if spec.method_kind == "pool":
            _check_pool(spec, origin.name)
        save_lineage(spec)
    outcomes = rebuild_flow(spec.name)
    for out in outcomes:
        print(f"{out.checkpoint_id}\t{out.status}\tversion {out.version or '-'}\t{out.reason}")
    what = "pool merge(s)" if spec.method_kind == "pool" else "fold(s)"
    print(f"lineage {spec.name}: {spec.method} rebuild of {origin.name}, {len(outcomes)} {what}")
    return 0


def _check_pool(spec: LineageSpec, origin: str) -> None:
    """Before NEW exists: every task of the pool names calibration data (else nothing is made)."""
    from mergeflow.errors import CheckpointError
    from mergeflow.tasks.calibration import check_pool_calibration
    from mergeflow.tasks.replay import rebuild_queue

    queue = rebuild_queue.fn(spec)
    if not queue:
        return
    try:
        check_pool_calibration(spec, queue)
    except CheckpointError as e:
        raise ConfigError(
            f"{spec.name} would merge {len(queue)} checkpoint(s) of {origin} as one pool: "
            f"{e.problem} (checkpoint {e.source}); nothing was created"
        ) from None


def _mlflow_env() -> None:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        use_stack_env()


def cmd_export(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.storage.publish import export_version

    _mlflow_env()
    res = export_version(
        args.model_uri, Path(args.out), base_model=args.base_model, overwrite=args.overwrite
    )
    print(
        f"exported {res.registered_model} version {res.version} to {res.path} "
        f"(model card {res.path / 'README.md'})"
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.lineage import load_lineage
    from mergeflow.storage.publish import publish_version

    use_stack_env()
    spec = load_lineage(args.name)
    which = f"/{args.version}" if args.version else f"@{args.alias}"
    res = publish_version(
        f"models:/{spec.registered_model}{which}",
        args.to,
        private=True if args.private else None,
        message=args.message,
        base_model=args.base_model,
    )
    print(f"published {spec.registered_model} version {res.version} to {args.to}: {res.commit_url}")
    return 0
