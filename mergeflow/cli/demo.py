"""`mergeflow demo`: the whole pipeline on the embedded stack, end to end.

1. `mergeflow up` (Prefect + MLflow on SQLite, SeaweedFS S3) under MERGEFLOW_HOME;
2. build the digits suite (tiny HF ViT base + N fine-tuned checkpoints on sklearn's
   digits, cached under ``<home>/demo/digits``); upload the base and the evaluation data
   to ``s3://<bucket>/demo/``;
3. create the lineage ``digits-demo`` (OPCM; source ``s3://<bucket>/demo/published``;
   storage ``s3://<bucket>/lineages/digits-demo``; watch every 10 s);
4. start ``mergeflow serve`` as the stack's ``deployments`` process;
5. publish the checkpoints one by one (each waits for the previous one's version), while
   the deployments run watch -> event -> fold -> evaluate -> register;
6. print a live table and exit 0 once N versions are registered (2 with a reason on timeout).

Everything it registers is keyed by checkpoint digest, so a second run on the same home
publishes nothing new, folds nothing twice and exits 0 at once. Unless ``keep_running``,
it stops what it started (the stack if it started it, and the served deployments).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.context import refresh_global_settings_context

from mergeflow.cli.tables import LiveTable
from mergeflow.evaluation.spec import GateSpec, TaskSpec
from mergeflow.examples.digits import build_digits_suite
from mergeflow.flows.watch import active_fold_targets
from mergeflow.lineage import LineageSpec, save_lineage
from mergeflow.services.process import log_tail
from mergeflow.services.stack import Stack
from mergeflow.settings import Settings
from mergeflow.storage.registry import Registry
from mergeflow.storage.schemes import open_store

LINEAGE = "digits-demo"
SERVE_PROCESS = "deployments"
WATCH_SECONDS = 10


def _say(msg: str) -> None:
    print(msg, flush=True)


def _upload_folder(store: Any, folder: Path, weights_last: bool = True) -> None:
    """Upload a checkpoint folder; the weights go last, so the source sees it complete only at the end."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    files.sort(key=lambda p: p.suffix == ".safetensors" if weights_last else 0)
    for p in files:
        info = store.list(p.name)
        if info and info[0].size == p.stat().st_size:
            continue
        store.put_file(p, p.name)


def run_demo(
    checkpoints: int = 6,
    *,
    keep_running: bool = False,
    timeout: float = 1800.0,
    home: str | None = None,
    say: Callable[[str], None] = _say,
) -> int:
    """Run the demo (see the module docstring); returns the process exit code."""

    if not 1 <= checkpoints <= 8:
        say("mergeflow: error: --checkpoints must be between 1 and 8")
        return 2
    t_start = time.monotonic()
    settings = Settings(home=Path(home)) if home else Settings()
    stack = Stack(settings)
    started_stack = not stack.is_up()
    say(f"mergeflow demo: {checkpoints} checkpoints, home {settings.home}")
    say(
        "starting the stack (Prefect, MLflow, S3) ..."
        if started_stack
        else "the stack is already running; using it"
    )
    stack.up()
    os.environ.update(stack.env())
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect-client"))
    started_serve = False
    try:
        code, started_serve = _run(stack, checkpoints, timeout - (time.monotonic() - t_start), say)
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        if keep_running:
            say(
                f"left running (--keep-running): stop everything with `mergeflow down{' --home ' + home if home else ''}`"
            )
        elif started_stack:
            stopped = stack.down()
            say(f"stopped what the demo started: {', '.join(stopped)}")
        elif started_serve:
            stack.stop_process(SERVE_PROCESS)
            say(
                "stopped the served deployments the demo started (the stack was already running and stays up)"
            )
    return code


def _run(stack: Any, n: int, budget: float, say: Callable[[str], None]) -> tuple[int, bool]:

    refresh_global_settings_context()

    deadline = time.monotonic() + budget
    settings = stack.settings
    bucket = f"s3://{settings.bucket}"
    t0 = time.monotonic()
    say(
        f"building the digits suite under {settings.home / 'demo' / 'digits'} (cached after the first run) ..."
    )
    suite = build_digits_suite(
        settings.home / "demo" / "digits", n_tasks=n, log=lambda m: say(f"  {m}")
    )
    say(f"  ready in {time.monotonic() - t0:.0f}s")
    base_uri = f"{bucket}/demo/base"
    _upload_folder(open_store(base_uri), suite.base)
    tasks = []
    for name, cid in zip(suite.task_names, suite.checkpoint_ids, strict=True):
        data = open_store(f"{bucket}/demo/data/{name}")
        for split in ("validation", "test"):
            path = suite.data[name][split]
            if not data.exists(path.name):
                data.put_file(path, path.name)
        tasks.append(
            TaskSpec(name=name, checkpoint=cid, data=f"{bucket}/demo/data/{name}/{{split}}.npz")
        )
    source = f"{bucket}/demo/published"
    suite_spec = suite.evaluation_suite().model_copy(update={"tasks": tuple(tasks)})
    spec = LineageSpec(
        name=LINEAGE,
        description="mergeflow demo: a tiny ViT on sklearn digits, one task per checkpoint",
        base=base_uri,
        method="opcm",
        sources=(source,),
        evaluation=suite_spec,
        gate=GateSpec(min_acc=0.2),
        store=f"{bucket}/lineages/{LINEAGE}",
        device="cpu",
        schedule=WATCH_SECONDS,
    )
    save_lineage(
        spec, replace=True
    )  # the same spec on a second run; base/method/storage never change
    say(f"lineage {LINEAGE}: OPCM on {base_uri}, watching {source}, storing under {spec.store}")

    status = stack.start_process(
        stack.command(
            SERVE_PROCESS, [sys.executable, "-m", "mergeflow", "serve", "--lineage", LINEAGE]
        )
    )
    started_serve = True
    s = settings
    say(f"served deployments running (pid {status.pid}, log {status.log})")
    say(f"Prefect UI:  {s.prefect_ui_url}/deployments   (flow runs: {s.prefect_ui_url}/runs)")
    say(
        f"MLflow UI:   {s.mlflow_url}/#/models/{spec.registered_model}   (runs: experiment mergeflow/{LINEAGE})"
    )

    registry = Registry()
    table = LiveTable(list(suite.task_names), say)
    published = open_store(source)
    ids = list(suite.checkpoint_ids)

    def registered() -> list[Any]:
        vs = registry.versions(spec.registered_model)
        table.update(vs)
        return [v for v in vs if v.checkpoint_id in ids]

    for i, folder in enumerate(suite.checkpoints):
        done = {v.checkpoint_id for v in registered()}
        if folder.name in done:
            continue
        say(f"publishing {folder.name} to {source}/{folder.name}/ ({i + 1}/{n})")
        _upload_folder(published.child(folder.name), folder)
        while folder.name not in {v.checkpoint_id for v in registered()}:
            if time.monotonic() > deadline:
                return _timeout(stack, registered(), n, say), started_serve
            time.sleep(1.0)
    versions = registered()
    while len({v.checkpoint_id for v in versions}) < n:
        if time.monotonic() > deadline:
            return _timeout(stack, versions, n, say), started_serve
        time.sleep(1.0)
        versions = registered()
    _settle(LINEAGE, deadline)
    champion = registry.champion(spec.registered_model)
    say(
        f"done: {n} versions of {spec.registered_model} registered; champion = version {champion.version if champion else '-'}"
    )
    say(
        "scores are test-split accuracies (the gate and any candidate selection read only the validation split)"
    )
    say(f"see the lineage in MLflow: {s.mlflow_url}/#/models/{spec.registered_model}")
    return 0, started_serve


def _settle(lineage: str, deadline: float) -> None:
    """Wait until no fold run of ``lineage`` is queued or running, so stopping serve cuts none short."""

    end = min(deadline, time.monotonic() + 60)
    while active_fold_targets(lineage) and time.monotonic() < end:
        time.sleep(1.0)


def _timeout(stack: Any, versions: list[Any], n: int, say: Callable[[str], None]) -> int:

    got = len({v.checkpoint_id for v in versions})
    say(f"mergeflow: error: timed out with {got} of {n} versions registered")
    log = stack.run_dir / f"{SERVE_PROCESS}.log"
    if log.exists():
        say(f"last lines of {log}:\n{log_tail(log, 25)}")
    return 2
