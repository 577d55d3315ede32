"""Seconds from publishing a checkpoint to its registered MLflow version, and where they go.

    python benchmarks/latency.py [--checkpoints 4] [--watch-seconds 5] [--home DIR] [--push]
                                 [--start forkserver|spawn] [--model digits|vit-b32]
                                 [--max-examples N]

Starts the embedded stack in its own home (default ``benchmarks/_work/latency``, free
ports), builds the digits suite there (tiny HF ViT, cached), creates a fresh lineage
(OPCM, S3 source and storage), serves the deployments with ``mergeflow serve`` and
publishes the checkpoints one at a time, each after the previous one is registered.
For each it reads the Prefect runs and task runs and splits publish -> version into:

- ``detect``: publish -> the fold run is created (watch tick on its schedule + event +
  automation); on average about half the watch interval plus one watch run. With
  ``--push`` the watch never runs: SeaweedFS calls the webhook receiver (started by
  ``mergeflow serve``) for each written file, and the receiver's push flow emits the event;
- ``start``: fold run created -> running (runner poll + the run's process: a fork of the
  warm fork server, or with ``--start spawn`` a fresh Python, as ``mergeflow serve --start``);
- ``lock``: running -> the fold-checkpoint subflow starts (lineage lock, registry, source listing);
- ``load``: load the parent state, identify, validate and screen the checkpoint (headers and
  ``config.json``; since 2026-12-06 the fold sums ``‖τ‖/‖θ₀‖`` as it reads, so no tensor is
  read here);
- ``fold``: the fold task; ``export``: write the merged weights;
- ``eval``: evaluate (validation + test), the checkpoint's own scores, gate;
- ``register``: the MLflow run, LoggedModel, artifacts and version (the commit point);
- ``total``: publish -> version ``creation_timestamp``.

``--model vit-b32`` keeps the digits data and evaluation but swaps the tiny ViT for one
with ViT-B/32's encoder (hidden 768, 12 layers, 12 heads, MLP 3072: the 72 projected
matrices of ``compare.py --suite vit-b32``, 85.8 M parameters; 8x8 images in patches of 2,
so 17 tokens instead of 50): a seeded random base and checkpoints that add a small random
task vector to it (no training at that size here). Its scores are near chance; the
timings are what counts.

Stops everything it started at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHASES = ("detect", "start", "lock", "load", "fold", "export", "eval", "register", "total")
DETECT = ("tick", "watch", "trigger")
"""``detect`` split (poll mode): publish -> the emitting watch run starts (negative when the
tick started before the upload ended), that run's own seconds, its end -> fold run created."""


def _free_ports() -> dict[str, int]:
    from mergeflow.services import s3_server
    from mergeflow.services.process import free_port_block

    s3 = free_port_block(s3_server.PORTS_PER_SERVER)
    out = {"s3_port": s3}
    for name in ("prefect_port", "mlflow_port"):
        p = free_port_block(1)
        while p in range(s3, s3 + s3_server.PORTS_PER_SERVER) or p in out.values():
            p = free_port_block(1)
        out[name] = p
    return out


def _runs(client: Any, flow: str, **params: str) -> list[Any]:
    """The latest 200 runs of ``flow`` that left the schedule (the watch keeps ~100 queued)."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=200,
    )
    return [r for r in runs if all((r.parameters or {}).get(k) == v for k, v in params.items())]


def _task_runs(client: Any, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )


def _secs(a: datetime | None, b: datetime | None) -> float:
    return (b - a).total_seconds() if a and b else float("nan")


def measure(lineage: str, ck: str, t_publish: datetime, version: Any) -> dict[str, float]:
    """Split publish -> registered version for one checkpoint from Prefect's run records."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        fold_runs = [r for r in _runs(client, "mergeflow-fold", lineage=lineage) if r.start_time]
        sub = next(
            r for r in _runs(client, "mergeflow-fold-checkpoint") if r.name == f"{lineage}-{ck}"
        )
        parent = next(
            r
            for r in fold_runs
            if r.id == sub.parent_task_run_id
            or any(t.id == sub.parent_task_run_id for t in _task_runs(client, r.id))
        )
        tasks = _task_runs(client, sub.id)
        watches = [
            r
            for r in _runs(client, "mergeflow-watch")
            if r.start_time and r.end_time and r.end_time <= parent.created
        ]
    watch = max(watches, key=lambda r: r.end_time, default=None)

    def dur(*prefixes: str) -> float:
        return sum(
            _secs(t.start_time, t.end_time)
            for t in tasks
            if t.name.startswith(prefixes) and t.end_time
        )

    return {
        "detect": _secs(t_publish, parent.created),
        "start": _secs(parent.created, parent.start_time),
        "lock": _secs(parent.start_time, sub.start_time),
        "load": dur("load-parent", "identify-checkpoint", "validate-checkpoint", "screen-"),
        "fold": dur("fold-"),
        "export": dur("export-"),
        "eval": dur("evaluate-", "own-scores", "gate"),
        "register": dur("register-version"),
        "total": _secs(t_publish, version.created_at),
        "tick": _secs(t_publish, watch.start_time) if watch else float("nan"),
        "watch": _secs(watch.start_time, watch.end_time) if watch else float("nan"),
        "trigger": _secs(watch.end_time, parent.created) if watch else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoints", type=int, default=4, help="checkpoints to publish (default 4)")
    ap.add_argument(
        "--watch-seconds", type=int, default=5, help="watch schedule interval (default 5)"
    )
    ap.add_argument(
        "--home", default=str(REPO / "benchmarks" / "_work" / "latency"), help="stack home"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each version")
    ap.add_argument(
        "--push",
        action="store_true",
        help="detect by push (SeaweedFS -> webhook receiver) instead of the watch schedule",
    )
    ap.add_argument(
        "--start",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how served runs start (mergeflow serve --start; default forkserver)",
    )
    ap.add_argument(
        "--model",
        choices=("digits", "vit-b32"),
        default="digits",
        help="the digits suite's tiny ViT (default) or ViT-B/32's encoder widths (see above)",
    )
    ap.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="cap on evaluation examples per task and split (default: all, 200 + 297)",
    )
    args = ap.parse_args(argv)

    from mergeflow.services.stack import Stack
    from mergeflow.settings import Settings

    home = Path(args.home).absolute()
    stack = Stack(Settings(home=home, **_free_ports()))
    _configure_push(stack, args.push)
    print(f"starting the stack under {home} ...", flush=True)
    stack.up()
    os.environ.update(stack.env())
    os.environ["PREFECT_HOME"] = str(home / "prefect-client")
    try:
        return _run(stack, args)
    finally:
        print(f"stopped: {', '.join(stack.down())}")


def _configure_push(stack: Any, push: bool) -> None:
    """With ``push``: SeaweedFS notifies a receiver on a free port (its ``notification.toml``,
    read when it starts) and ``serve`` starts that receiver; without: no notifications."""
    from mergeflow.services.process import free_port_block

    toml = stack.home / "s3" / "notification.toml"
    if stack.running():
        stack.down()  # SeaweedFS reads notification.toml at start
    if not push:
        toml.unlink(missing_ok=True)
        return
    port = free_port_block(1)
    token = uuid.uuid4().hex
    toml.parent.mkdir(parents=True, exist_ok=True)
    toml.write_text(
        "[notification.webhook]\nenabled = true\n"
        f'endpoint = "http://127.0.0.1:{port}/webhooks/seaweedfs"\nbearer_token = "{token}"\n'
    )
    os.environ.update(MERGEFLOW_RECEIVER_PORT=str(port), MERGEFLOW_RECEIVER_SEAWEEDFS_TOKEN=token)


def _vit_b32_files(suite: Any, root: Path) -> Any:
    """The suite with its base and checkpoints swapped for ViT-B/32-wide ones (module doc)."""
    import dataclasses

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from mergeflow.examples.suite import save_tensors

    def config(folder: Path) -> dict[str, Any]:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
        cfg.update(intermediate_size=3072)
        return dict(cfg)

    def model(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        cfg = {k: v for k, v in cfg.items() if k != "transformers_version"}
        return ViTForImageClassification(ViTConfig.from_dict(cfg)).state_dict()

    base_dir, cks = root / "base", tuple(root / "checkpoints" / c.name for c in suite.checkpoints)
    if not all((d / "model.safetensors").exists() for d in (base_dir, *cks)):
        print(f"writing ViT-B/32-wide base and {len(cks)} checkpoints under {root} ...")
        base_cfg = config(suite.base)
        base = {k: v for k, v in model(base_cfg, 0).items() if not k.startswith("classifier.")}
        save_tensors(base_dir, base_cfg, base)
        for i, (src, dst) in enumerate(zip(suite.checkpoints, cks, strict=True), start=1):
            cfg = config(src)
            own = model(cfg, i)
            gen = torch.Generator().manual_seed(1000 + i)
            tensors = {
                k: v + 0.02 * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v
                for k, v in base.items()
            }
            tensors.update({k: v for k, v in own.items() if k.startswith("classifier.")})
            save_tensors(dst, cfg, tensors)
    return dataclasses.replace(suite, base=base_dir, checkpoints=cks)


def _run(stack: Any, args: argparse.Namespace) -> int:
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    from mergeflow.evaluation.spec import GateSpec, TaskSpec
    from mergeflow.examples.digits import build_digits_suite
    from mergeflow.lineage import LineageSpec, save_lineage
    from mergeflow.services.process import log_tail
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_store

    n = args.checkpoints
    suite = build_digits_suite(Path(args.home) / "digits", n_tasks=n, log=print)
    if args.model == "vit-b32":
        suite = _vit_b32_files(suite, Path(args.home) / "vit-b32")
    run = uuid.uuid4().hex[:6]
    bucket = f"s3://{stack.settings.bucket}/latency-{run}"
    for p in suite.base.iterdir():
        open_store(f"{bucket}/base").put_file(p, p.name)
    tasks = []
    for name, cid in zip(suite.task_names, suite.checkpoint_ids, strict=True):
        for split in ("validation", "test"):
            open_store(f"{bucket}/data/{name}").put_file(suite.data[name][split], f"{split}.npz")
        tasks.append(
            TaskSpec(name=name, checkpoint=cid, data=f"{bucket}/data/{name}/{{split}}.npz")
        )
    spec = save_lineage(
        LineageSpec(
            name=f"latency-{run}",
            base=f"{bucket}/base",
            method="opcm",
            sources=(f"{bucket}/published",),
            evaluation=suite.evaluation_suite().model_copy(
                update={"tasks": tuple(tasks), "max_examples": args.max_examples}
            ),
            gate=GateSpec(),
            store=f"{bucket}/lineage",
            device="cpu",
            schedule="0 0 1 1 *" if args.push else args.watch_seconds,  # push: watch never runs
        )
    )
    st = stack.start_process(
        stack.command(
            "deployments",
            [sys.executable, "-m", "mergeflow", "serve", "--lineage", spec.name, "--poll", "1"]
            + ["--start", args.start],
        )
    )
    time.sleep(3 * args.watch_seconds)  # let the scheduler start the watch ticks (and the receiver)
    registry = Registry()
    rows: list[tuple[str, dict[str, float]]] = []
    t_first = datetime.now(timezone.utc)
    for folder in suite.checkpoints:
        dst = open_store(f"{bucket}/published/{folder.name}")
        dst.put_file(folder / "config.json", "config.json")
        dst.put_file(folder / "model.safetensors", "model.safetensors")
        t_publish = datetime.now(timezone.utc)
        deadline = time.monotonic() + args.timeout
        version = None
        while version is None:
            version = next(
                (
                    v
                    for v in registry.versions(spec.registered_model)
                    if v.checkpoint_id == folder.name
                ),
                None,
            )
            if version is None:
                if time.monotonic() > deadline:
                    print(f"timed out waiting for {folder.name}\n{log_tail(st.log or '', 30)}")
                    return 1
                time.sleep(0.5)
        time.sleep(1.0)  # let the run records settle
        rows.append((folder.name, measure(spec.name, folder.name, t_publish, version)))
        print(f"  {folder.name}: {rows[-1][1]['total']:.1f}s", flush=True)

    how = "push (SeaweedFS -> receiver)" if args.push else f"watch every {args.watch_seconds}s"
    how += f", runs started by {args.start}"
    model = "tiny ViT" if args.model == "digits" else "ViT-B/32 encoder widths"
    if args.max_examples:
        model += f", at most {args.max_examples} examples per task and split"
    print(
        f"\nseconds from publish to registered version ({n} checkpoints, {how}, {model} on digits)"
    )
    print(f"| checkpoint | {' | '.join(PHASES)} |")
    print(f"|---|{'---|' * len(PHASES)}")
    for name, r in rows:
        print(f"| {name} | {' | '.join(f'{r[p]:.2f}' for p in PHASES)} |")
    med = {p: statistics.median(r[p] for _, r in rows) for p in PHASES}
    print(f"| **median** | {' | '.join(f'{med[p]:.2f}' for p in PHASES)} |")
    if not args.push:
        print(f"\ndetect, split ({' | '.join(DETECT)}): the emitting watch run")
        for name, r in rows:
            print(f"  {name}: {' | '.join(f'{r[p]:.2f}' for p in DETECT)}")
        ran, cancelled = _ticks(spec.name, t_first)
        print(f"watch ticks due while publishing: {ran} ran, {cancelled} cancelled")
    return 0


def _ticks(lineage: str, since: datetime) -> tuple[int, int]:
    """Watch runs of ``lineage`` due between ``since`` and now: how many ran, how many were
    cancelled (a tick is cancelled when the watch's one slot is taken, ``CANCEL_NEW``)."""
    from prefect.client.orchestration import get_client

    now = datetime.now(timezone.utc)
    with get_client(sync_client=True) as client:
        runs = [
            r
            for r in _runs(client, "mergeflow-watch")
            if lineage in ((r.parameters or {}).get("lineages") or [])
            and r.expected_start_time
            and since <= r.expected_start_time <= now
        ]
    states = [r.state_type.value if r.state_type else "" for r in runs]
    return states.count("COMPLETED"), states.count("CANCELLED")


if __name__ == "__main__":
    sys.exit(main())
