"""Crash safety on the REAL stack: SIGKILL a fold at every point, then let the lineage resume.

For each kill point of ``tests/helpers/killpoints`` (reading, mid-fold, writing the state,
exporting, evaluating, right before registering, between creating the version and moving
the aliases) a ``mergeflow backfill`` process is killed there. Then:

- the registry holds no version of the checkpoint, or one complete version (its state and
  weights present);
- the next run resumes at once (the dead process's lineage lock is broken, not waited out),
  registers exactly one version, with ``newest``/``champion`` on it;
- its merged weights and state tensors are bit-identical to an uninterrupted run's;
- ``gc`` lists the killed attempt's orphan prefix and removes it, and only it.

CI runs one point (``register``); ``scripts/reliability.sh`` runs them all (``reliability``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from fixtures_stack import RunningStack

KILLPOINTS = Path(__file__).parent / "helpers" / "killpoints"
ALL_POINTS = ("read", "fold", "state", "export", "evaluate", "register", "aliases")
CI_POINTS = ("register",)


@dataclass(frozen=True)
class Setup:
    suite: Any
    bucket: str
    reference: dict[str, dict[str, torch.Tensor]]  # "model" / "state" tensors of t1


def _tensors(uri: str, state: bool = False) -> dict[str, torch.Tensor]:
    from mergeflow.storage import states
    from mergeflow.storage.schemes import open_checkpoint, open_store

    if state:
        _, reader = states.load_state(open_store(uri))
        assert reader is not None
    else:
        reader = open_checkpoint(uri).reader
    return {k: reader.get(k) for k in reader.keys()}


def _spec(name: str, setup: Setup) -> Any:
    from test_flows import lineage_spec

    from mergeflow.lineage import save_lineage

    prefix = f"s3://{setup.bucket}/crash-{name}"
    return save_lineage(
        lineage_spec(name, setup.suite, prefix, sources=(str(setup.suite.root / "checkpoints"),))
    )


@pytest.fixture(scope="module")
def setup(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from test_flows import build_mlp_suite

    from mergeflow.flows.fold import backfill_flow
    from mergeflow.storage.registry import Registry

    suite = build_mlp_suite(tmp_path_factory.mktemp("crash-suite"))
    partial = Setup(suite, stack.bucket, {})
    ref = _spec(f"crashref-{uuid.uuid4().hex[:6]}", partial)
    (out,) = backfill_flow(ref.name, [str(suite.checkpoints["t1"])])
    assert out.status == "accepted"
    (v,) = Registry().versions(ref.registered_model)
    yield Setup(
        suite,
        stack.bucket,
        {"model": _tensors(v.model_uri), "state": _tensors(v.state_uri, state=True)},
    )


def _kill_run(stack: RunningStack, spec: Any, uri: str, point: str, marker: Path) -> int:
    env = {
        **os.environ,
        **stack.full_env(),
        "PYTHONPATH": os.pathsep.join([str(KILLPOINTS), os.environ.get("PYTHONPATH", "")]),
        "MERGEFLOW_KILL_AT": point,
        "MERGEFLOW_KILL_ONCE": str(marker),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mergeflow", "backfill", spec.name, uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert marker.exists(), f"{point}: never reached\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.returncode


def _assert_complete(v: Any) -> None:
    from mergeflow.storage.schemes import open_store

    assert open_store(v.state_uri).exists("state.json"), v
    if v.status == "accepted":
        assert open_store(v.model_uri).exists("model.safetensors"), v


def kill_and_resume(
    stack: RunningStack, setup: Setup, point: str, tmp_path: Path
) -> dict[str, Any]:
    from mergeflow.flows.fold import backfill_flow
    from mergeflow.flows.maintenance import gc_flow
    from mergeflow.storage.registry import Registry
    from mergeflow.storage.schemes import open_store

    spec = _spec(f"crash-{point}-{uuid.uuid4().hex[:6]}", setup)
    uri = str(setup.suite.checkpoints["t1"])
    rc = _kill_run(stack, spec, uri, point, tmp_path / "killed")
    killed = time.monotonic()
    assert rc in (-9, 137), rc
    reg = Registry()
    after_kill = reg.versions(spec.registered_model)
    assert len(after_kill) <= 1, after_kill
    for v in after_kill:  # a version is whole or absent, never half-written
        _assert_complete(v)

    (out,) = backfill_flow(spec.name, [uri])
    resumed = time.monotonic() - killed
    versions = reg.versions(spec.registered_model)
    assert [v.checkpoint_id for v in versions] == ["t1"], versions
    (v,) = versions
    assert v.status == "accepted" and {"newest", "champion"} <= set(v.aliases), v
    _assert_complete(v)
    assert out.status == ("skipped" if after_kill else "accepted"), out
    identical = True
    for kind, uri_ in (("model", v.model_uri), ("state", v.state_uri)):
        got = _tensors(uri_, state=kind == "state")
        want = setup.reference[kind]
        assert sorted(got) == sorted(want)
        identical &= all(torch.equal(got[k], want[k]) for k in want)
    assert identical, f"{point}: the resumed fold differs from an uninterrupted one"

    orphans = gc_flow(spec.name, dry_run=True)
    referenced = {v.state_uri.rsplit("/", 1)[0]}
    assert not set(orphans) & referenced
    assert gc_flow(spec.name) == orphans
    root = open_store(spec.store)
    left = {o.relpath.split("/")[1] for o in root.list("steps")}
    assert left == {r.rsplit("/", 1)[1] for r in referenced}, left
    return {
        "point": point,
        "version_after_kill": bool(after_kill),
        "resume_s": resumed,
        "orphans": len(orphans),
        "bit_identical": identical,
    }


def _report(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"RELIABILITY kill {r['point']:<9} version after kill: {r['version_after_kill']!s:<5} "
            f"resumed+refolded in {r['resume_s']:.1f} s, bit-identical: {r['bit_identical']}, "
            f"orphans collected: {r['orphans']}"
        )


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("point", CI_POINTS)
def test_a_fold_killed_at_a_point_resumes_bit_identical(
    stack: RunningStack, setup: Setup, point: str, tmp_path: Path
) -> None:
    _report([kill_and_resume(stack, setup, point, tmp_path)])


@pytest.mark.reliability
@pytest.mark.timeout(7200)
def test_kill_matrix(
    stack: RunningStack, setup: Setup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rounds = int(os.environ.get("MERGEFLOW_KILL_ROUNDS", "1"))
    rows = [
        kill_and_resume(stack, setup, point, tmp_path_factory.mktemp(f"kill-{point}"))
        for _ in range(rounds)
        for point in ALL_POINTS
    ]
    _report(rows)
    n = len(rows)
    print(
        f"RELIABILITY kill-matrix: {n} kills at {len(ALL_POINTS)} points: 0 partial versions, "
        f"{sum(r['bit_identical'] for r in rows)} resumed bit-identical"
    )


# ----------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root; skipped otherwise)."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.services
@pytest.mark.slow
def test_a_full_disk_fails_the_fold_cleanly_and_it_resumes_with_room(
    stack: RunningStack, tmp_path: Path, small_disk: Path
) -> None:
    from safetensors.torch import save_file

    from mergeflow.flows.fold import backfill_flow
    from mergeflow.lineage import LineageSpec, save_lineage
    from mergeflow.storage.registry import Registry

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(512, 512, generator=g), "b": torch.randn(512, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "pub").mkdir()
    ck = tmp_path / "pub" / "c1.safetensors"
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(ck))
    spec = save_lineage(
        LineageSpec(
            name=f"fulldisk-{uuid.uuid4().hex[:6]}",
            base=str(tmp_path / "base.safetensors"),
            method="task_arithmetic",
            sources=(str(tmp_path / "pub"),),
            store=str(small_disk / "lineage"),  # 1 MiB: the 1 MiB state does not fit
            device="cpu",
        )
    )
    with pytest.raises(Exception) as err:
        backfill_flow(spec.name, [str(ck)])
    msg = str(err.value)
    print(f"RELIABILITY full disk: {type(err.value).__name__}: {msg[:300]}")
    assert "No space left on device" in msg and str(small_disk) in msg, msg
    assert Registry().versions(spec.registered_model) == []  # nothing registered
    # nothing committed: no state.json of step 1 (the fold task leaves a step-0 manifest copy
    # with the lineage's parameters in the attempt's prefix; gc removes it)
    steps = [json.loads(p.read_text())["info"]["step"] for p in small_disk.rglob("state.json")]
    assert all(step == 0 for step in steps), steps
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    (out,) = backfill_flow(spec.name, [str(ck)])
    assert out.status == "accepted"


# ----------------------------------------------------------------------------- restarts
@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of this module's own: its servers get restarted under a running fold."""
    from fixtures_stack import _settings, _start, _stop, use_stack_env

    running = _start(_settings(tmp_path_factory.mktemp("restart-home")))
    try:
        with use_stack_env(running):
            yield running
    finally:
        _stop(running)


@pytest.mark.reliability
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("service", ["mlflow", "s3", "prefect"])
def test_a_service_restart_during_a_fold(
    service: str, own_stack: RunningStack, tmp_path: Path
) -> None:
    """Restart a server while a fold runs: the fold survives it, or fails with one message
    naming the service and the next run folds the checkpoint once."""
    import threading

    from prefect.client.orchestration import get_client
    from test_flows import build_mlp_suite, lineage_spec

    from mergeflow.flows.fold import backfill_flow
    from mergeflow.flows.lock import record_name
    from mergeflow.lineage import save_lineage
    from mergeflow.storage.registry import Registry

    suite = build_mlp_suite(tmp_path / "suite")
    tag = uuid.uuid4().hex[:6]
    spec = save_lineage(
        lineage_spec(
            f"restart-{service}-{tag}",
            suite,
            f"s3://{own_stack.bucket}/restart-{tag}",
            sources=(str(suite.root / "checkpoints"),),
        )
    )
    uri = str(suite.checkpoints["t1"])
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["out"] = backfill_flow(spec.name, [uri])
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 300
        while client.read_variable_by_name(record_name(spec.concurrency_name)) is None:
            assert time.monotonic() < deadline and t.is_alive(), result
            time.sleep(0.1)
    time.sleep(1.0)
    down = time.monotonic()
    own_stack.stack.stop_process(service)
    time.sleep(5)
    own_stack.stack.up()
    outage = time.monotonic() - down
    t.join(timeout=900)
    outcome = "survived"
    if "error" in result:
        msg = str(result["error"])
        words = {
            "mlflow": ("MLflow", "mlflow", "tracking"),
            "s3": ("S3",),
            "prefect": ("Prefect", "prefect", "api"),
        }
        assert any(w in msg for w in words[service]), f"{service}: unclear failure: {msg[:500]}"
        outcome = f"failed cleanly ({type(result['error']).__name__}: {msg[:160]}), rerun folded it"
        backfill_flow(spec.name, [uri])
    versions = Registry().versions(spec.registered_model)
    assert [v.checkpoint_id for v in versions] == ["t1"], versions
    _assert_complete(versions[0])
    print(f"RELIABILITY restart {service} ({outage:.0f} s outage) during a fold: {outcome}")


def test_io_tasks_retry_a_service_that_did_not_answer_but_not_a_bad_input() -> None:
    from prefect.states import Failed

    from mergeflow.errors import CheckpointError, ConfigError, ServiceUnavailable
    from mergeflow.tasks.retry import not_user_error

    assert not_user_error(None, None, Failed(data=ServiceUnavailable("cannot reach S3")))
    assert not_user_error(None, None, Failed(data=OSError("connection reset")))
    assert not not_user_error(None, None, Failed(data=CheckpointError("c", "bad header")))
    assert not not_user_error(None, None, Failed(data=ConfigError("no such bucket")))
