"""Crash recovery under load: a served fold SIGKILLed while the 10 x 10 load runs (issue 21).

    python benchmarks/crash_under_load.py [--lineages 10] [--checkpoints 10] [--rounds 3]
                                          [--after-first-fold] [--serve-args "--limit 2"]
                                          [--home DIR] [--keep]

The quiet-machine probe (``tests/test_reliability_lock.py``,
``test_a_crashed_fold_blocks_neither_its_lineage_nor_another``) run inside the load test
(``tests/test_reliability_load.py``), with the tests' own helpers:

1. starts the embedded stack (``tests/fixtures_stack.py``) in its own home (default
   ``benchmarks/_work/crash_under_load``, free ports) and one ``mergeflow serve`` for
   ``--lineages`` load lineages (the load test's, watched every 30 s) plus one crash lineage
   (the lock test's digits MLP lineage on S3, watched every 5 s). ``serve`` runs with the
   kill points of ``tests/helpers/killpoints`` (``MERGEFLOW_KILL_AT=fold``, only in flow
   runs of the crash lineage): the flow-run process is SIGKILLed after the second state
   tensor of its fold is written;
2. publishes every load checkpoint at once (``--checkpoints`` per lineage); with
   ``--after-first-fold`` it then waits until the first load version is registered. Without
   it the first round starts at once: its fold runs before the load's first watch tick
   (every 30 s) and its recovery competes with the load for ``serve``'s run slots (with it,
   the crash lineage's first fold waits for a free run slot, which came only at the load's
   end in the development box's runs);
3. each round: publishes the crash lineage's next checkpoint (``t1``, ``t2``, …) and emits
   its event twice more (two runs queue behind the one that is killed, as in the quiet
   probe), waits for the kill, checks that the registry holds no version of it or a
   complete one, and times from the kill (the kill marker's mtime) to: the lineage lock
   free (or held by another process), the checkpoint's version registered (its MLflow
   creation time), and the version registered with no fold run of the lineage left
   active (``wait_for_version``: the quiet probe's "folded again"). The kill point is
   re-armed for the next round only then;
4. waits for the load to finish and checks it as the load test does (every chain in
   publication order, each checkpoint once, parents unbroken), checks the crash lineage's
   chain, that each killed run ended Crashed, and counts "database is locked" in the logs.

Printed: one line per round (times, 1-min load average at the kill and its maximum
during the recovery, load folds registered during the recovery and how many were left),
then a summary with the medians. The 1-min load average is sampled every 2 s.
Stops everything it started; ``--keep`` keeps the home (logs) for inspection.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
KILLPOINTS = TESTS / "helpers" / "killpoints"
ROUND_CHECKPOINTS = ("t1", "t2", "t3", "t4")  # the good checkpoints of the digits MLP suite


class LoadSampler:
    """The 1-min load average every ``every`` seconds, in a thread, as (wall time, load)."""

    def __init__(self, every: float = 2.0) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self._stop.wait(every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[float]:
        return [v for t, v in self.samples if t0 <= t <= t1] or [os.getloadavg()[0]]


def _wait(what: str, ok: Any, timeout: float, every: float = 1.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return time.time()
        time.sleep(every)
    raise SystemExit(f"crash_under_load: {what} not within {timeout:.0f} s")


def _load_versions(specs: list[Any]) -> dict[str, list[Any]]:
    from mergeflow.storage.registry import Registry

    reg = Registry()
    return {s.name: reg.versions(s.registered_model) for s in specs}


def crash_round(
    ck: str, crash: Any, prefix: str, suite: Any, marker: Path, log: Path, timeout: float
) -> dict[str, Any]:
    """Publish ``ck`` to the crash lineage, let its fold be killed, time the recovery."""
    from prefect.client.orchestration import get_client
    from test_flows import publish, wait_for_version
    from test_reliability_crash import _assert_complete

    from mergeflow.flows.events import emit_published
    from mergeflow.flows.lock import read_holder
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_source

    marker.unlink(missing_ok=True)  # arms the kill point: the next fold of the lineage dies
    published = time.time()
    publish(prefix, suite, ck)
    (c,) = [x for x in open_source(f"{prefix}/published").list() if x.id == ck]
    ref = c.model_copy(update={"source": f"{prefix}/published"})
    for _ in range(2):  # two more runs queue behind the one that will be killed
        emit_published(crash.name, ref)
    _wait(f"the kill of {crash.name}'s fold of {ck}", marker.exists, timeout, every=0.2)
    killed = marker.stat().st_mtime
    killed_pid = int(marker.read_text().split()[1])
    reg = Registry()
    after_kill = [v for v in reg.versions(crash.registered_model) if v.checkpoint_id == ck]
    assert len(after_kill) <= 1, after_kill
    for v in after_kill:  # a version is whole or absent, never half-written
        _assert_complete(v)

    lock_free: float | None = None
    version = None
    next_version_read = 0.0
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while version is None and time.monotonic() < deadline:
            if lock_free is None:
                limit = client.read_global_concurrency_limit_by_name(crash.concurrency_name)
                holder = read_holder(client, crash.concurrency_name)
                if limit.active_slots == 0 or (holder is not None and holder.pid != killed_pid):
                    lock_free = time.time() - killed
            if time.monotonic() >= next_version_read:
                next_version_read = time.monotonic() + 1.0
                version = next(
                    (v for v in reg.versions(crash.registered_model) if v.checkpoint_id == ck),
                    None,
                )
            time.sleep(0.2)
    seen = time.time()
    assert version is not None, f"{crash.name}: no version of {ck} {timeout:.0f} s after the kill"
    v = wait_for_version(crash.registered_model, ck, log, timeout=timeout)  # runs settled
    settled = time.time()
    _assert_complete(v)
    created = v.created_at.timestamp() if v.created_at else seen
    return {
        "checkpoint": ck,
        "published": published,
        "killed": killed,
        "reach_kill_s": killed - published,
        "version_after_kill": bool(after_kill),
        "lock_free_s": lock_free,
        "registered_s": created - killed,
        "settled_s": settled - killed,
        "settled": settled,
        "status": v.status,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lineages", type=int, default=10, help="load lineages (default 10)")
    ap.add_argument("--checkpoints", type=int, default=10, help="per load lineage (default 10)")
    ap.add_argument("--rounds", type=int, default=3, choices=range(1, 5), help="kills (1-4)")
    ap.add_argument("--serve-args", default="", help='extra `mergeflow serve` args ("--limit 2")')
    ap.add_argument("--home", type=Path, default=REPO / "benchmarks" / "_work" / "crash_under_load")
    ap.add_argument("--timeout", type=float, default=600.0, help="per wait (s)")
    ap.add_argument("--load-timeout", type=float, default=2400.0, help="the whole load (s)")
    ap.add_argument(
        "--after-first-fold",
        action="store_true",
        help="start the first round once a load version is registered (default: at once)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the home (logs) afterwards")
    args = ap.parse_args()

    sys.path.insert(0, str(TESTS))
    from fixtures_stack import _settings, _start, _stop, use_stack_env

    if args.home.exists():
        shutil.rmtree(args.home)
    (args.home / "stack").mkdir(parents=True)
    t_start = time.time()
    running = _start(_settings(args.home / "stack"))
    print(f"stack up in {time.time() - t_start:.0f} s (home {args.home})", flush=True)
    ok = False
    try:
        with use_stack_env(running), LoadSampler() as loads:
            run(args, running, loads)
        ok = True
    finally:
        _stop(running)
        if ok and not args.keep:
            shutil.rmtree(args.home, ignore_errors=True)
        elif not ok:
            print(f"logs kept under {args.home}", flush=True)


def run(args: argparse.Namespace, running: Any, loads: LoadSampler) -> None:
    from helpers.cli import start_serve
    from test_flows import build_mlp_suite, lineage_spec
    from test_reliability_crash import _assert_complete
    from test_reliability_load import _runs
    from test_reliability_once import assert_chain, make_lineage, publish_burst

    from mergeflow.lineage import save_lineage
    from mergeflow.storage.registry import Registry

    home: Path = args.home
    tag = uuid.uuid4().hex[:6]
    suite = build_mlp_suite(home / "mlp")
    prefix = f"s3://{running.bucket}/crash-{tag}"
    crash = save_lineage(lineage_spec(f"crash-{tag}", suite, prefix))
    specs = [
        make_lineage(
            home / f"l{i}", f"load{i}-{tag}", f"s3://{running.bucket}/load-{tag}/{i}", schedule=30
        )
        for i in range(args.lineages)
    ]
    marker = home / "killed"
    marker.write_text("disarmed 0\n")  # present: nothing is killed until a round removes it
    env = {
        "PYTHONPATH": os.pathsep.join([str(KILLPOINTS), os.environ.get("PYTHONPATH", "")]),
        "MERGEFLOW_KILL_AT": "fold",
        "MERGEFLOW_KILL_ONCE": str(marker),
        "MERGEFLOW_KILL_MATCH": crash.name,
    }
    name = f"serve-crash-load-{tag}"
    t_serve = time.time()
    log = start_serve(running.stack, name, [*specs, crash], *args.serve_args.split(), env=env)
    print(f"serve up in {time.time() - t_serve:.0f} s", flush=True)
    try:
        t0 = time.time()
        ids = {
            s.name: publish_burst(home / f"l{i}" / "pub", args.checkpoints)
            for i, s in enumerate(specs)
        }
        total = args.lineages * args.checkpoints
        print(f"load: {total} checkpoints published in {time.time() - t0:.0f} s", flush=True)
        if args.after_first_fold:
            first = _wait(
                "the first load fold",
                lambda: any(_load_versions(specs).values()),
                args.timeout,
                every=2.0,
            )
            print(f"load: first version {first - t0:.0f} s after publishing", flush=True)
        rounds = []
        for ck in ROUND_CHECKPOINTS[: args.rounds]:
            r = crash_round(ck, crash, prefix, suite, marker, log, args.timeout)
            r["load_at_kill"] = loads.between(r["killed"] - 2.5, r["killed"] + 2.5)[0]
            r["load_max"] = max(loads.between(r["killed"], r["settled"]))
            rounds.append(r)
            print(
                f"round {len(rounds)} ({ck}): killed {r['reach_kill_s']:.0f} s after publishing; "
                f"registered {r['registered_s']:.1f} s after the kill, settled "
                f"{r['settled_s']:.1f} s; load {r['load_at_kill']:.1f}",
                flush=True,
            )

        # the load to its end, checked as the load test checks it
        _wait(
            "the whole load",
            lambda: all(len(v) >= args.checkpoints for v in _load_versions(specs).values()),
            args.load_timeout,
            every=5.0,
        )
        chains = {s.name: assert_chain(s.registered_model, ids[s.name]) for s in specs}
        created = sorted(
            v.created_at.timestamp() for vs in chains.values() for v in vs if v.created_at
        )
        crash_versions = sorted(
            Registry().versions(crash.registered_model), key=lambda v: int(v.version)
        )
        assert [v.checkpoint_id for v in crash_versions] == [r["checkpoint"] for r in rounds], [
            v.checkpoint_id for v in crash_versions
        ]
        for v in crash_versions:
            _assert_complete(v)
        crash_runs = _runs({crash.name})
        crashed = sum(1 for r in crash_runs if r.state_type and r.state_type.value == "CRASHED")
        logs = [log, *running.stack.run_dir.glob("*.log")]
        locked = sum(p.read_text(errors="replace").count("database is locked") for p in logs)
    finally:
        running.stack.stop_process(name)

    load_s = created[-1] - t0
    for i, r in enumerate(rounds, 1):
        before = sum(1 for c in created if c < r["killed"])
        during = sum(1 for c in created if r["killed"] <= c <= r["killed"] + r["settled_s"])
        left = total - before - during
        lock = f"{r['lock_free_s']:.1f} s" if r["lock_free_s"] is not None else "not seen"
        print(
            f"RELIABILITY crash-under-load round {i} ({r['checkpoint']}): fold SIGKILLed "
            f"{r['reach_kill_s']:.0f} s after publishing, version after the kill: "
            f"{'complete' if r['version_after_kill'] else 'none'}; lock free {lock} after the "
            f"kill; registered ({r['status']}) {r['registered_s']:.1f} s after it; folded again "
            f"(runs settled) {r['settled_s']:.1f} s after it; load avg {r['load_at_kill']:.1f} "
            f"at the kill, max {r['load_max']:.1f}; load folds registered before the kill "
            f"{before} of {total}, during the recovery {during}, after it {left}"
        )
    med_reg = statistics.median(r["registered_s"] for r in rounds)
    med_set = statistics.median(r["settled_s"] for r in rounds)
    registered = ", ".join(f"{r['registered_s']:.1f}" for r in rounds)
    settled = ", ".join(f"{r['settled_s']:.1f}" for r in rounds)
    complete = sum(r["version_after_kill"] for r in rounds)
    window = loads.between(rounds[0]["killed"], rounds[-1]["settled"])
    print(
        f"RELIABILITY crash-under-load: {len(rounds)} kills while the {args.lineages} x "
        f"{args.checkpoints} load ran or had just ended (each round's line says which); "
        f"registered again {registered} s after the kill (median "
        f"{med_reg:.1f}); folded again (runs settled) {settled} s after it (median "
        f"{med_set:.1f}); load avg during the rounds {min(window):.1f}-{max(window):.1f} (mean "
        f"{statistics.mean(window):.1f}); versions right after the kills: {complete} complete, "
        f"0 partial; {crashed} fold runs Crashed; load: {total} folds in {load_s:.0f} s, in "
        f"order, none lost or doubled; {locked} 'database is locked' in the logs"
    )


if __name__ == "__main__":
    main()
