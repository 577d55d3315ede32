"""`mergeflow up`, `down` and `status`: the embedded service stack.

Only argparse is imported at module level, so `mergeflow merge` works without the
pipeline extra; the stack (pydantic-settings, boto3, ...) is imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import TYPE_CHECKING, Any

from mergeflow.errors import ConfigError

if TYPE_CHECKING:
    from mergeflow.services.stack import Stack


def register(subparsers: Any) -> None:
    """Add `up`, `down` and `status` to the `mergeflow` sub-command parsers."""
    p = subparsers.add_parser(
        "up",
        help="start the local stack: Prefect server, MLflow server, S3 object store",
        description=(
            "Start the embedded stack in the background (data, logs and pid files under "
            "MERGEFLOW_HOME, default ~/.mergeflow): a Prefect server and an MLflow server on "
            "SQLite and a SeaweedFS S3 server, all on 127.0.0.1 with telemetry off. With "
            "MERGEFLOW_PROFILE=production, Prefect and MLflow use MERGEFLOW_PREFECT_DATABASE_URL "
            "and MERGEFLOW_MLFLOW_BACKEND_STORE_URI and S3 comes from the environment. Services "
            "already running are left alone. Prints the Prefect and MLflow UI URLs."
        ),
    )
    _home_option(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for each server to answer (default: MERGEFLOW_HEALTH_TIMEOUT_S, 180)",
    )
    p.add_argument(
        "--receiver",
        action="store_true",
        help="also start the webhook receiver (push-triggered folds; see `mergeflow receive`) and "
        "register its MLflow webhook",
    )
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser(
        "down",
        help="stop the local stack (and any served deployments it started)",
        description="Stop every process `up` started: SIGTERM to its process group, then SIGKILL "
        "after --timeout seconds. Data stays under MERGEFLOW_HOME. Safe to run twice.",
    )
    _home_option(p)
    p.add_argument(
        "--timeout", type=float, default=20.0, help="grace period per service (default: 20)"
    )
    p.set_defaults(func=cmd_down)

    p = subparsers.add_parser(
        "status",
        help="show each local service, its pid, URL and health",
        description="Exit 0 when every core service is healthy, 1 otherwise.",
    )
    _home_option(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print JSON")
    group.add_argument(
        "--env",
        action="store_true",
        help='print `export VAR=...` lines for clients: eval "$(mergeflow status --env)"',
    )
    p.set_defaults(func=cmd_status)


def _home_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="stack home (default: MERGEFLOW_HOME, else ~/.mergeflow)")


def _stack(args: argparse.Namespace) -> Stack:
    try:
        # pipeline extra: loaded on use, the light CLI runs without it
        from mergeflow.services.stack import Stack

        # pipeline extra: loaded on use, the light CLI runs without it
        from mergeflow.settings import Settings
    except ImportError as err:
        raise ConfigError(
            f"the service stack needs the pipeline extra (pip install 'mergeflow[pipeline]'): {err}"
        ) from err
    overrides: dict[str, Any] = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    return Stack(Settings(**overrides))


def cmd_up(args: argparse.Namespace) -> int:
    stack = _stack(args)
    s = stack.settings
    print(f"starting the mergeflow stack (home {s.home}) ...", flush=True)
    stack.up(timeout=args.timeout)
    for st in stack.status():
        print(f"  {st.name:<10} pid {st.pid or '-':<8} {st.url or '-'}")
    print(f"Prefect UI:  {stack.prefect_ui_url}")
    print(f"MLflow UI:   {stack.mlflow_url}")
    if args.receiver:
        from mergeflow.cli.receive import start_service

        print(f"Receiver:    {start_service(stack)} (/webhooks/mlflow, /hub, /seaweedfs)")
    if stack.s3_endpoint_url:
        print(f"S3 endpoint: {stack.s3_endpoint_url} (bucket {s.bucket})")
    print('Point clients at it with:  eval "$(mergeflow status --env)"')
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = _stack(args)
    stopped = stack.down(timeout=args.timeout)
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = _stack(args)
    if args.env:
        for key, value in sorted(stack.env().items()):
            print(f"export {key}={shlex.quote(value)}")
        return 0
    statuses = stack.status()
    ok = bool(statuses) and all(
        st.healthy for st in statuses if st.name in ("s3", "prefect", "mlflow")
    )
    if args.json:
        print(json.dumps([st.model_dump() for st in statuses], indent=2))
        return 0 if ok else 1
    print(f"home: {stack.home}")
    print(f"{'SERVICE':<12}{'PID':<9}{'STATE':<11}URL")
    for st in statuses:
        state = "healthy" if st.healthy else ("unhealthy" if st.running else "stopped")
        print(f"{st.name:<12}{st.pid or '-':<9}{state:<11}{st.url or '-'}")
    return 0 if ok else 1
