"""Pipeline commands: `lineage create|show|list`, `serve`, `watch`, `backfill`, `gc`, `reevaluate`, `demo`.

History and publishing commands (`lineage drop|resume|branch|rebuild`, `export`, `publish`,
`receive`) live in :mod:`mergeflow.cli.lineage_ops`. Only argparse is imported at module level; Prefect, MLflow and torch load when a command
runs. Clients reach the stack through PREFECT_API_URL / MLFLOW_TRACKING_URI / AWS_*; when
PREFECT_API_URL is unset and `mergeflow up` runs under MERGEFLOW_HOME, its environment is used.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mergeflow.cli import lineage_ops, receive
from mergeflow.cli.stackenv import use_stack_env


def register(subparsers: Any) -> None:
    """Add the pipeline sub-commands to the `mergeflow` parser."""
    lp = subparsers.add_parser(
        "lineage", help="create, show and list lineages (a base, a method, sources, a gate)"
    )
    ls = lp.add_subparsers(dest="lineage_command", metavar="ACTION", required=True)
    p = ls.add_parser(
        "create",
        help="validate a lineage YAML and register it",
        description=(
            "Validate SPEC.yaml (see mergeflow.lineage), write it to <storage>/lineage.yaml, register it in the Prefect "
            "server (Variable mergeflow_lineage__<name>) and create its fold lock (global concurrency limit "
            "mergeflow-fold-<name>, 1 slot). Restart `mergeflow serve` to schedule its watch deployment."
        ),
    )
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument(
        "--replace",
        action="store_true",
        help="update an existing lineage (base, method, storage and registered model cannot change)",
    )
    p.set_defaults(func=cmd_lineage_create)
    p = ls.add_parser("show", help="print a lineage's spec and its version chain from MLflow")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lineage_show)
    p = ls.add_parser("list", help="list registered lineages")
    p.set_defaults(func=cmd_lineage_list)
    lineage_ops.register_lineage(ls)

    p = subparsers.add_parser(
        "serve",
        help="serve the watch, fold, backfill, re-evaluate and gc deployments from this process",
        description=(
            "Serve every lineage's watch deployment (on its schedule), the event-triggered fold deployment and the manual "
            "backfill/reevaluate/gc deployments from this process until interrupted. Each run executes in a subprocess, "
            "forked from a warm fork server by default (--start)."
        ),
    )
    p.add_argument(
        "--lineage",
        action="append",
        metavar="NAME",
        help="serve watch for these lineages only (default: all registered)",
    )
    p.add_argument(
        "--fold-limit",
        type=int,
        default=2,
        help="fold runs at once across lineages (default 2; one per lineage always)",
    )
    p.add_argument(
        "--limit", type=int, default=4, help="flow runs this process executes at once (default 4)"
    )
    p.add_argument(
        "--poll",
        type=float,
        default=2.0,
        help="seconds between polls for scheduled runs (default 2)",
    )
    p.add_argument("--gc-cron", help="also run gc for every lineage on this cron schedule")
    p.add_argument(
        "--start",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how each run's process starts: a fork of a process that has imported torch, "
        "Prefect, MLflow and mergeflow once (default), or a fresh interpreter (Prefect's own)",
    )
    p.add_argument(
        "--no-receiver",
        action="store_true",
        help="do not start the webhook receiver (default: started when MERGEFLOW_RECEIVER_* "
        "secrets are set and its port is free; see `mergeflow receive`)",
    )
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "watch", help="run a lineage's watch flow once, here (emits events for new checkpoints)"
    )
    p.add_argument("name")
    p.set_defaults(func=cmd_watch)
    p = subparsers.add_parser(
        "backfill", help="fold the given checkpoints into a lineage, in order, here"
    )
    p.add_argument("name")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_URI")
    p.set_defaults(func=cmd_backfill)
    p = subparsers.add_parser(
        "reevaluate", help="score a registered version again with the lineage's suite"
    )
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(func=cmd_reevaluate)
    p = subparsers.add_parser(
        "gc", help="delete storage prefixes that no registered version references"
    )
    p.add_argument("name")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.set_defaults(func=cmd_gc)

    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the embedded stack: MiniLM fine-tunes folded with OPCM, a gate, a baseline",
        description=(
            "Start the embedded stack (MERGEFLOW_HOME), build the suite (cached under the home; default text: the real "
            "all-MiniLM-L6-v2 and N fine-tunes of it, the second with a learning rate that wrecks the backbone; digits: a "
            "tiny ViT on sklearn's digits), create the lineage text-demo (or digits-demo; OPCM, a gate on forgetting and "
            "plasticity, source s3://<bucket>/demo/...), serve the deployments, publish the checkpoints one by one and "
            "let watch -> event -> fold -> evaluate -> gate -> register run. Prints a live table, the UI URLs and the "
            "champion's ACC, normalized ACC and BWT beside weight averaging of the same accepted checkpoints; exits 0 "
            "once N versions are registered. A second run on the same home folds nothing twice. The stack and its UIs "
            "stay up afterwards (`mergeflow down` stops them) unless --stop."
        ),
    )
    p.add_argument(
        "--suite",
        choices=["text", "digits"],
        default="text",
        help="text (default: all-MiniLM-L6-v2 fine-tunes) or digits (a tiny ViT)",
    )
    p.add_argument(
        "--checkpoints",
        type=int,
        default=None,
        metavar="N",
        help="how many checkpoints to publish (default 6; text 1-6, digits 1-8)",
    )
    p.add_argument(
        "--stop",
        action="store_true",
        help="stop what the demo started when it ends (default: leave the stack and its UIs up)",
    )
    p.add_argument("--keep-running", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="give up after S seconds (default 1800)",
    )
    p.add_argument("--home", help="stack home (default: MERGEFLOW_HOME, else ~/.mergeflow)")
    p.set_defaults(func=cmd_demo)
    lineage_ops.register(subparsers)
    receive.register(subparsers)


def cmd_lineage_create(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.lineage import LineageSpec, save_lineage

    spec = LineageSpec.from_yaml(args.spec)
    use_stack_env()
    save_lineage(spec, replace=args.replace)
    print(
        f"lineage {spec.name}: {spec.method} on {spec.base}, store {spec.store}, registered model {spec.registered_model}"
    )
    print(
        f"watching {', '.join(spec.sources)} every {spec.schedule}{'s' if isinstance(spec.schedule, int) else ''}; restart `mergeflow serve` to schedule it"
    )
    return 0


def cmd_lineage_show(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.cli.tables import format_candidates, format_chain

    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.lineage import load_lineage

    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.storage.registry import Registry

    use_stack_env()
    spec = load_lineage(args.name)
    versions = Registry().versions(spec.registered_model)
    if args.json:
        print(
            json.dumps(
                {
                    "spec": spec.model_dump(mode="json"),
                    "versions": [v.model_dump(mode="json") for v in versions],
                },
                indent=2,
            )
        )
        return 0
    print(spec.to_yaml().rstrip())
    print(f"\nversions of {spec.registered_model} (newest last):")
    print(format_chain(versions))
    print(format_candidates(versions), end="")
    print(lineage_ops.format_history(spec, versions), end="")
    return 0


def cmd_lineage_list(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.lineage import list_lineages

    use_stack_env()
    rows = list_lineages()
    if not rows:
        print("no lineages; create one with `mergeflow lineage create SPEC.yaml`")
    for r in rows:
        print(f"{r.get('name')}\t{r.get('registered_model')}\t{r.get('spec_uri')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.deployments import serve

    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.lineage import list_lineages, load_lineage

    use_stack_env()
    names = args.lineage or [str(r["name"]) for r in list_lineages()]
    specs = [load_lineage(n) for n in names]
    print(f"serving mergeflow deployments for {', '.join(names) or 'no lineage yet'}", flush=True)
    if not args.no_receiver:
        receive.start_in_thread()  # push-triggered folds; watch stays the safety net
    serve(
        specs,
        fold_limit=args.fold_limit,
        limit=args.limit,
        poll_seconds=args.poll,
        gc_cron=args.gc_cron,
        start=args.start,
    )
    return 0


def _print_outcomes(outcomes: Any) -> None:
    for o in outcomes:
        print(f"{o.checkpoint_id}\t{o.status}\tversion {o.version or '-'}\t{o.reason}")


def cmd_watch(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.watch import watch_flow

    use_stack_env()
    emitted = watch_flow([args.name])[args.name]
    print(f"emitted {len(emitted)} event(s): {', '.join(emitted) or '-'}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.fold import backfill_flow

    use_stack_env()
    _print_outcomes(backfill_flow(args.name, list(args.checkpoints)))
    return 0


def cmd_reevaluate(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.maintenance import reevaluate_flow

    use_stack_env()
    ev = reevaluate_flow(args.name, args.version)
    print(json.dumps({"validation": ev.validation, "test": ev.test}, indent=2))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.flows.maintenance import gc_flow

    use_stack_env()
    dropped = gc_flow(args.name, dry_run=args.dry_run)
    print("\n".join(dropped) if dropped else "nothing to delete")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.cli.demo import run_demo

    return run_demo(
        checkpoints=args.checkpoints,
        suite=args.suite,
        stop=args.stop,
        timeout=args.timeout,
        home=args.home,
    )
