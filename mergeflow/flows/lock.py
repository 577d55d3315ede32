"""The lineage lock: one fold, backfill or gc per lineage at a time, never held by a dead run.

The lock is the Prefect global concurrency limit ``mergeflow-fold-<lineage>`` (1 slot). A
holder takes the slot with a lease of :data:`LOCK_LEASE_S` (60 s, the shortest lease
Prefect's server grants) and a thread renews it every :data:`RENEW_S` while the holder
lives, so a fold may run for hours and no second one enters meanwhile. Right after taking
the slot the holder writes its **holder record**, the Prefect Variable
``mergeflow_lock__<lineage>``: lease id, flow run id, host and process (see
:class:`Holder`). The record goes just before the slot is released.

A dead holder frees the lineage in three ways, fastest first:

1. the runner that served the run marks it Crashed and runs :func:`reap_crashed_run` (an
   ``on_crashed`` hook of every flow that takes the lock): it releases the run's leases at
   once and marks its still-running subflows and task runs Crashed, so no run keeps
   saying "Running" after its process died;
2. a waiter polls (after :data:`POLL_S`, backing off to :data:`POLL_MAX_S`); while the slot
   is taken it reads the holder record and breaks the lock (:func:`reap`, same clean-up)
   when the holder's flow run is in a final state, or when the holder ran in this host's
   process namespace and its process is gone (a killed CLI run, or a runner that died with
   its children);
3. otherwise the lease runs out at most :data:`LOCK_LEASE_S` after its last renewal and
   Prefect's repossessor (a 15 s loop; 5 s on the embedded stack) frees the slot.

A Prefect server that restarts with its default in-memory lease storage forgets every
lease while its limits keep counting the slots; :func:`free` frees such an orphaned slot
(the embedded stack stores leases on disk, so its restarts forget nothing).

**Fencing.** Prefect offers no compare-and-set on the registry, and a holder that lost its
lease (renewal failed for a whole lease, e.g. a network partition) might still be running.
So right before anything that must happen under the lock takes effect (registering a
version, deleting prefixes in gc) the holder calls :func:`fence`: it renews the lease
synchronously and raises :class:`LockLost` if the lease is gone. A renewed lease is valid
for another :data:`LOCK_LEASE_S`, far longer than registering takes.

The fold deployments' own concurrency (one queued run per lineage, see
:mod:`mergeflow.flows.deployments`) keeps runs that wait for a lineage out of every other
lineage's way; :data:`FOLD_SLOTS` caps folds across lineages and is taken only once the
lineage lock is held, so a waiting run never holds a slot that another lineage needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger
from prefect.states import Crashed
from pydantic import BaseModel, ConfigDict

from mergeflow.errors import StateError
from mergeflow.lineage import LineageSpec
from mergeflow.pids import pid_alive, start_ticks

LOCK_LEASE_S = 60.0
"""Lease of the lineage lock and of a fold slot, in seconds (Prefect's server minimum)."""
RENEW_S = 15.0
"""How often the holder renews its leases."""
POLL_S = 1.0
"""A waiter's first pause before trying the lock again (and checking whether the holder is
dead); each further pause doubles, up to :data:`POLL_MAX_S`."""
POLL_MAX_S = 5.0
"""Longest pause between tries: each try is a write, and on SQLite every waiter trying each
second contended with the folds' own writes (docs/reliability.md, Load)."""
FOLD_SLOTS = "mergeflow-folds"
"""Global concurrency limit capping folds across lineages (created by ``serve``; optional)."""
RECORD_PREFIX = "mergeflow_lock__"
ORPHAN_RECHECK_S = 10.0
"""How long a slot whose lease the server forgot must stay unclaimed before it is freed."""

LIVE_STATES = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED)
log = get_logger("mergeflow.lock")


class LockLost(StateError):
    """The lineage lock's lease is gone: nothing may be committed by this holder any more."""


class Holder(BaseModel):
    """The holder record of a lineage lock (the value of its Prefect Variable)."""

    model_config = ConfigDict(frozen=True)

    lock: str
    lease_id: str
    slot_lease_id: str = ""
    flow_run_id: str = ""
    host: str
    pid: int
    pid_start: str = ""
    since: str


# ------------------------------------------------------------------ processes
def host_id() -> str:
    """Host name, boot id and PID namespace: equal only where process ids mean the same."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def process_alive(pid: int, start: str) -> bool:
    """Whether the process ``pid`` that started at ``start`` (:func:`start_ticks` as text) runs."""
    if not start:
        return pid_alive(pid)
    return pid_alive(pid) and str(start_ticks(pid)) == start


# ------------------------------------------------------------------ holder records
def lock_of(lineage: str) -> str:
    """The lock's name for a lineage name (= :attr:`LineageSpec.concurrency_name`)."""
    return f"mergeflow-fold-{lineage}"


def record_name(lock: str) -> str:
    return RECORD_PREFIX + lock.removeprefix("mergeflow-fold-").replace("-", "_")


def read_holder(client: SyncPrefectClient, lock: str) -> Holder | None:
    var = client.read_variable_by_name(record_name(lock))
    if var is None or not isinstance(var.value, dict):
        return None
    try:
        return Holder.model_validate(var.value)
    except ValueError:
        return None


def _write_holder(client: SyncPrefectClient, holder: Holder) -> None:
    """Create or replace the record; only the lock's holder writes it, so the retries only
    cover a record that a reaper deleted or created between our read and our write."""
    name, value = record_name(holder.lock), holder.model_dump()
    for _ in range(3):
        if client.read_variable_by_name(name) is None:
            try:
                client.create_variable(
                    VariableCreate(name=name, value=value, tags=["mergeflow-lock"])
                )
                return
            except ObjectAlreadyExists:
                continue
        try:
            client.update_variable(VariableUpdate(name=name, value=value))
            return
        except (ObjectNotFound, httpx.HTTPStatusError) as e:
            if isinstance(e, httpx.HTTPStatusError) and e.response.status_code != 404:
                raise
    raise StateError(f"could not write the holder record of {holder.lock}")


def _clear_holder(client: SyncPrefectClient, lock: str, lease_id: str) -> None:
    """Drop the record if it is still ``lease_id``'s (a later holder may have replaced it)."""
    held = read_holder(client, lock)
    if held is not None and held.lease_id == lease_id:
        client.delete_variable_by_name(record_name(lock))


# ------------------------------------------------------------------ reaping
def _crash_children(client: SyncPrefectClient, flow_run_id: UUID, message: str) -> None:
    """Mark the unfinished subflows (recursively) and task runs of ``flow_run_id`` Crashed."""
    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
            ),
            limit=200,
        )
        frontier = [c.id for c in children]
        ids += frontier
        for c in children:
            if c.state_type in LIVE_STATES:
                client.set_flow_run_state(c.id, Crashed(message=message), force=True)
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(LIVE_STATES)))
        ),
        limit=200,
    )
    for t in tasks:
        client.set_task_run_state(t.id, Crashed(message=message), force=True)


def _lease_known(client: SyncPrefectClient, lease_id: UUID) -> bool:
    """Whether the server still holds ``lease_id`` (renewing it is the only way to ask)."""
    try:
        client.renew_concurrency_lease(lease_id, LOCK_LEASE_S)
    except httpx.HTTPStatusError as e:
        if e.response.status_code in (404, 410):
            return False
        raise
    return True


def free(client: SyncPrefectClient, name: str, lease_id: UUID, record_lock: str = "") -> None:
    """Release a lease, and free the slot it counted when the server forgot the lease.

    Prefect's default lease storage is in memory: a server restart forgets every lease while
    the limits keep counting their slots, which would then be held forever. A forgotten
    lease's slot is freed by name; for the lineage lock (``record_lock``) only if, after
    :data:`ORPHAN_RECHECK_S`, the lock is still full and its holder record still names this
    lease (a lease that expired normally was already freed, and a new holder would have
    written its own record). The embedded stack keeps leases on disk, so this is for other
    servers (see docs/reliability.md).
    """
    if _lease_known(client, lease_id):
        client.release_concurrency_slots_with_lease(lease_id)
        return
    if record_lock:
        time.sleep(ORPHAN_RECHECK_S)
        held = read_holder(client, record_lock)
        if held is not None and held.lease_id != str(lease_id):
            return
    limit = client.read_global_concurrency_limit_by_name(name)
    if limit.active_slots > 0:
        client.release_concurrency_slots(names=[name], slots=1, occupancy_seconds=1.0)
        log.warning("freed a slot of %s whose lease %s the Prefect server forgot", name, lease_id)


def reap(client: SyncPrefectClient, holder: Holder, reason: str) -> None:
    """Free a dead holder's lock: release its leases, mark its runs Crashed, drop its record."""
    if holder.slot_lease_id:
        free(client, FOLD_SLOTS, UUID(holder.slot_lease_id))
    free(client, holder.lock, UUID(holder.lease_id), record_lock=holder.lock)
    if holder.flow_run_id:
        run_id = UUID(holder.flow_run_id)
        message = f"mergeflow: {reason}"
        run = client.read_flow_run(run_id)
        if run.state_type in LIVE_STATES:
            client.set_flow_run_state(run_id, Crashed(message=message), force=True)
        _crash_children(client, run_id, message)
    _clear_holder(client, holder.lock, holder.lease_id)
    log.warning("broke lock %s held by flow run %s: %s", holder.lock, holder.flow_run_id, reason)


def dead_reason(client: SyncPrefectClient, holder: Holder) -> str | None:
    """Why ``holder`` is certainly dead, or None while it may be alive."""
    if holder.flow_run_id:
        with contextlib.suppress(Exception):
            run = client.read_flow_run(UUID(holder.flow_run_id))
            if run.state is not None and run.state.is_final():
                return f"its flow run {run.name!r} is {run.state.name} but still held the lock"
    if holder.host == host_id() and not process_alive(holder.pid, holder.pid_start):
        return f"its process {holder.pid} on this host is gone"
    return None


def reap_crashed_run(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` hook: free the lock a crashed run held and end its runs truthfully.

    Runs in the runner (``mergeflow serve``) right after it marked the run Crashed.
    """
    lineage = (flow_run.parameters or {}).get("lineage")
    if not lineage:
        return
    lock = lock_of(str(lineage))
    with get_client(sync_client=True) as client:
        holder = read_holder(client, lock)
        if holder is not None and holder.flow_run_id == str(flow_run.id):
            reap(client, holder, f"flow run {flow_run.name!r} crashed ({state.message})")
        else:  # crashed while waiting for the lock, or before writing its record
            _crash_children(client, flow_run.id, f"mergeflow: parent run {flow_run.name!r} crashed")


# ------------------------------------------------------------------ holding
@dataclass
class Lease:
    """One held lease, renewed by a thread until released."""

    name: str
    lease_id: UUID
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def renew(self, client: SyncPrefectClient) -> None:
        """Renew now; sets :attr:`lost` and raises :class:`LockLost` if the lease is gone."""
        try:
            client.renew_concurrency_lease(self.lease_id, LOCK_LEASE_S)
        except httpx.HTTPStatusError as e:
            if e.response.status_code in (404, 410):
                self.lost.set()
                raise LockLost(
                    f"the lease on {self.name} expired or was revoked; nothing was committed"
                ) from None
            raise

    def start(self) -> None:
        def loop() -> None:
            with get_client(sync_client=True) as client:
                while not self._stop.wait(RENEW_S):
                    try:
                        self.renew(client)
                    except LockLost:
                        log.error("lost the lease on %s", self.name)
                        return
                    except Exception as e:  # transient: the lease lives on until it expires
                        log.warning("renewing the lease on %s failed: %s", self.name, e)

        self._thread = threading.Thread(target=loop, daemon=True, name=f"lease-{self.name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_held: dict[str, Lease] = {}


def _try_acquire(client: SyncPrefectClient, name: str, holder: Any) -> tuple[bool, UUID | None]:
    """(acquired, lease id); lease id None when the limit does not exist."""
    try:
        resp = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=LOCK_LEASE_S, holder=holder
        )
    except httpx.HTTPStatusError as e:
        if e.response.status_code == 423:
            return False, None
        raise
    body = resp.json()
    if not body.get("limits"):
        with contextlib.suppress(Exception):
            client.release_concurrency_slots_with_lease(UUID(body["lease_id"]))
        return True, None
    return True, UUID(body["lease_id"])


def _acquire(client: SyncPrefectClient, name: str, holder: Any, on_busy: Any = None) -> UUID | None:
    """Wait for a slot of ``name``; ``on_busy()`` runs between tries (breaks dead holders)."""
    waited, pause = 0.0, POLL_S
    while True:
        acquired, lease = _try_acquire(client, name, holder)
        if acquired:
            if waited:
                log.info("took %s after waiting %.1f s", name, waited)
            return lease
        if on_busy is not None:
            on_busy()
        time.sleep(pause)
        waited += pause
        pause = min(2 * pause, POLL_MAX_S)


def _ensure_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit ``name`` or set its size; safe when several runs
    do it at once (Prefect's own upsert is a read then a create, and the loser of that race
    gets 409: the first two events of a new lineage used to fail one of their runs)."""
    with get_client(sync_client=True) as client:
        for _ in range(3):
            try:
                existing = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit)
                    )
                    return
                except ObjectAlreadyExists:
                    continue  # created meanwhile by another run: read it
            if existing.limit != limit:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit)
                )
            return
    raise StateError(f"could not create the concurrency limit {name}")


def ensure_fold_lock(spec: LineageSpec) -> None:
    """Create the lineage's 1-slot global concurrency limit if it does not exist."""
    _ensure_limit(spec.concurrency_name, 1)


def ensure_fold_slots(limit: int) -> None:
    """Create or resize :data:`FOLD_SLOTS` (``mergeflow serve --fold-limit``)."""
    _ensure_limit(FOLD_SLOTS, limit)


@contextlib.contextmanager
def lineage_lock(spec: LineageSpec, *, fold_slot: bool = False) -> Iterator[None]:
    """Hold the lineage's lock (and, with ``fold_slot``, one of :data:`FOLD_SLOTS`) inside.

    Waits as long as a live run holds the lock; breaks the lock of a dead one (module doc).
    """
    lock = spec.concurrency_name
    ensure_fold_lock(spec)
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else ""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
    leases: list[Lease] = []
    with get_client(sync_client=True) as client:

        def break_dead() -> None:
            current = read_holder(client, lock)
            reason = dead_reason(client, current) if current is not None else None
            if current is not None and reason is not None:
                reap(client, current, reason)

        lease_id = _acquire(client, lock, holder, break_dead)
        if lease_id is None:
            raise StateError(f"the lineage lock {lock} does not exist and could not be created")
        leases.append(Lease(lock, lease_id))
        try:
            record = Holder(
                lock=lock,
                lease_id=str(lease_id),
                flow_run_id=run_id,
                host=host_id(),
                pid=os.getpid(),
                pid_start=str(start_ticks(os.getpid()) or ""),
                since=datetime.now(timezone.utc).isoformat(),
            )
            _write_holder(client, record)
            leases[0].start()
            if fold_slot:
                slot = _acquire(client, FOLD_SLOTS, holder)
                if slot is not None:
                    leases.append(Lease(FOLD_SLOTS, slot))
                    leases[-1].start()
                    _write_holder(client, record.model_copy(update={"slot_lease_id": str(slot)}))
            _held[lock] = leases[0]
            yield
        finally:
            _held.pop(lock, None)
            for lease in reversed(leases):
                lease.stop()
            # The record goes while the lock is still ours: cleared after the release, it
            # could delete (or lose a race with) the next holder's record.
            with contextlib.suppress(Exception):
                _clear_holder(client, lock, str(lease_id))
            for lease in reversed(leases):  # the fold slot, then the lock
                try:
                    free(client, lease.name, lease.lease_id, lock if lease.name == lock else "")
                except Exception as e:  # the lease expires by itself
                    log.warning("releasing %s failed (%s); its lease expires", lease.name, e)


def fence(spec: LineageSpec) -> None:
    """Right before a commit: prove this process still holds the lineage lock (module doc).

    Raises :class:`LockLost` when the lease is gone. A no-op outside :func:`lineage_lock`.
    """
    lease = _held.get(spec.concurrency_name)
    if lease is None:
        log.debug("fence(%s) outside lineage_lock: nothing to check", spec.name)
        return
    if lease.lost.is_set():
        raise LockLost(f"the lease on {lease.name} was lost earlier; nothing was committed")
    with get_client(sync_client=True) as client:
        lease.renew(client)
