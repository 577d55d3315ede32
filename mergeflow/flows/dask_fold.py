"""One fold with the per-tensor work spread over a Dask cluster (prefect-dask's DaskTaskRunner).

A continual fold is per tensor except for its scalar epilogue: each tensor's new state
depends only on that tensor's base, task vector and previous state, and the method's
``finish`` needs only two sums (‖D_t‖², ‖τ_t‖²) over all tensors. So this flow:

1. splits the merged tensor names into ``groups`` contiguous groups of similar byte size;
2. submits one ``fold-group`` task per group to the DaskTaskRunner. Each task opens the
   base, the checkpoint and the previous state itself (lazy readers: ranged reads on S3),
   folds its tensors with :func:`mergeflow.merging.engine.fold_tensors`, streams
   them into its own shard ``tensors/step-NNNNN/part-GGGGG.safetensors`` and returns its
   weight map and its two partial sums;
3. writes the shards' index, the checkpoint's head tensors, runs ``finish`` on the summed
   norms and writes ``state.json`` last (the same layout and commit rule as
   :func:`mergeflow.storage.state_store.fold_checkpoint`).

The result equals the sequential fold tensor for tensor (same per-tensor arithmetic); the
coefficient can differ in the last bits because the norms are summed in another order.
Methods with a whole-model pre-pass (TIES with ``trim: global``) get it on the driver.

Use ``address`` for an existing Dask cluster (``tcp://scheduler:8786``), otherwise a
``LocalCluster`` on 127.0.0.1 with ``n_workers`` workers (processes or threads) and no
dashboard is started for the run and closed after it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from prefect import flow, task

from mergeflow.errors import StateError


def split_groups(sizes: list[tuple[str, int]], groups: int) -> list[list[str]]:
    """Contiguous groups of names with roughly equal total bytes (order kept, none empty)."""
    groups = max(1, min(groups, len(sizes)))
    total = sum(s for _, s in sizes) or 1
    out: list[list[str]] = [[]]
    acc = 0
    for i, (name, size) in enumerate(sizes):
        left_items = len(sizes) - i
        left_groups = groups - len(out)
        if (
            out[-1]
            and (acc >= total * len(out) / groups or left_items == left_groups)
            and left_groups > 0
        ):
            out.append([])
        out[-1].append(name)
        acc += size
    return out


def _open(
    base_uri: str, checkpoint_uri: str, state_uri: str, allow_pickle: bool
) -> tuple[Any, Any, Any, Any]:
    from mergeflow.storage import state_store
    from mergeflow.storage.checkpoints import open_checkpoint
    from mergeflow.storage.store import open_store

    base = open_checkpoint(base_uri, allow_pickle=allow_pickle)
    ck = open_checkpoint(checkpoint_uri, base=base.reader, allow_pickle=allow_pickle)
    manifest, state = state_store.load_state(open_store(state_uri))
    return base, ck, manifest, state


@task(name="fold-group", task_run_name="fold-group-{index}")
def fold_group(
    base_uri: str,
    checkpoint_uri: str,
    state_uri: str,
    out_state_uri: str,
    plan: Any,
    keys: list[str],
    index: int,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Fold ``keys`` and write them as shard ``part-<index>``; returns its weight map and partial norms."""
    from mergeflow.merging import engine
    from mergeflow.storage.safetensors_io import ShardedWriter
    from mergeflow.storage.store import StoreSink, open_store

    base, ck, manifest, state = _open(base_uri, checkpoint_uri, state_uri, allow_pickle)
    rel = f"tensors/step-{plan.step:05d}"
    writer = ShardedWriter(StoreSink(open_store(out_state_uri), rel), prefix=f"part-{index:05d}")
    try:
        sq_state, sq_tau = engine.fold_tensors(
            manifest.info, plan, state, base.reader, ck.reader, writer, keys=keys, device=device
        )
        names = writer.commit(engine.state_metadata(plan.step))
    except BaseException:
        writer.abort()
        raise
    if len(names) == 1:
        weight_map = dict.fromkeys(keys, names[0])
    else:
        out = open_store(out_state_uri)
        idx_rel = f"{rel}/part-{index:05d}.safetensors.index.json"
        weight_map = json.loads(out.read_bytes(idx_rel))["weight_map"]
        out.delete_prefix(idx_rel)
    return {"weight_map": weight_map, "sq_state": sq_state, "sq_tau": sq_tau}


def _runner(address: str | None, n_workers: int, processes: bool) -> Any:
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "processes": processes,
        "threads_per_worker": 1,
        "dashboard_address": None,
    }
    if processes:  # worker processes talk TCP: loopback only (threads use in-process transport)
        kwargs["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=kwargs)


@flow(name="mergeflow-dask-fold")
def _dask_fold(
    base_uri: str,
    checkpoint_uri: str,
    checkpoint_id: str,
    digest: str,
    state_uri: str,
    out_state_uri: str,
    groups: int,
    device: str,
    allow_pickle: bool,
) -> dict[str, Any]:
    from mergeflow.merging import engine
    from mergeflow.storage import state_store
    from mergeflow.storage.safetensors_io import ShardedWriter
    from mergeflow.storage.store import StoreSink, open_store

    t0 = time.perf_counter()
    base, ck, manifest, _ = _open(base_uri, checkpoint_uri, state_uri, allow_pickle)
    info = manifest.info
    plan = engine.plan_fold(
        info, base.reader, ck.reader, checkpoint_id=checkpoint_id, digest=digest, device=device
    )
    sizes = [(k, math.prod(base.reader.meta(k).shape) or 1) for k in plan.keys]
    parts = [
        fold_group.submit(
            base_uri, checkpoint_uri, state_uri, out_state_uri, plan, g, i + 1, device, allow_pickle
        )
        for i, g in enumerate(split_groups(sizes, groups))
    ]
    results = [p.result() for p in parts]
    step = plan.step
    out = open_store(out_state_uri)
    rel_t, rel_h = f"tensors/step-{step:05d}", f"heads/step-{step:05d}"
    weight_map: dict[str, str] = {}
    for r in results:
        weight_map.update(r["weight_map"])
    index = {
        "metadata": engine.state_metadata(step),
        "weight_map": {k: weight_map[k] for k in plan.keys},
    }
    out.write_bytes(f"{rel_t}/model.safetensors.index.json", json.dumps(index, indent=2).encode())
    head_map = dict(manifest.heads)
    if plan.heads:
        hw = ShardedWriter(StoreSink(out, rel_h))
        for k in plan.heads:
            hw.add(k, ck.reader.get(k))
        hw.commit({"mergeflow.checkpoint": checkpoint_id})
        head_map[checkpoint_id] = f"{out.uri.rstrip('/')}/{rel_h}"
    new_info = engine.finish_fold(
        info,
        plan,
        sum(r["sq_state"] for r in results),
        sum(r["sq_tau"] for r in results),
        ck.uri,
    )
    state_store.write_manifest(
        out,
        state_store.StateManifest(
            info=new_info, tensors=f"{out.uri.rstrip('/')}/{rel_t}", heads=head_map
        ),
    )
    return {"step": step, "groups": len(results), "seconds": time.perf_counter() - t0}


def dask_fold(
    base_uri: str,
    checkpoint_uri: str,
    state_uri: str,
    out_state_uri: str,
    *,
    checkpoint_id: str,
    digest: str,
    groups: int = 4,
    address: str | None = None,
    n_workers: int = 2,
    processes: bool = True,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Fold ``checkpoint_uri`` into the state at ``state_uri``, writing the new state at ``out_state_uri``.

    ``out_state_uri`` must differ from ``state_uri`` (a fresh prefix). Returns step, group
    count and seconds. Runs ``mergeflow-dask-fold`` as a flow (or a subflow when called
    inside one) on a DaskTaskRunner (see the module docstring).
    """
    if out_state_uri.rstrip("/") == state_uri.rstrip("/"):
        raise StateError("the Dask fold writes a new state; give a fresh out_state_uri")
    fl = _dask_fold.with_options(task_runner=_runner(address, n_workers, processes))
    return fl(
        base_uri,
        checkpoint_uri,
        checkpoint_id,
        digest,
        state_uri,
        out_state_uri,
        groups,
        device,
        allow_pickle,
    )
