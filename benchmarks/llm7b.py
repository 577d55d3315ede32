"""7B in constant memory, measured (issue 21): Llama-2-7B shapes through mergeflow's folds.

Run from the repository root::

    .venv/bin/python benchmarks/llm7b.py                # 6 of the 32 layers: the run in benchmarks/README.md, within the hour
    .venv/bin/python benchmarks/llm7b.py --layers 32    # the full size, if the disk allows (else as many layers as fit)
    .venv/bin/python benchmarks/llm7b.py --layers 3 --keep    # keep the built inputs for the next run
    .venv/bin/python benchmarks/llm7b.py --layers 3 --only s3-task_arithmetic,s3-baseline   # some groups, in this order
    .venv/bin/python benchmarks/llm7b.py --s3-inputs    # upload base and checkpoints to the S3 store too
    .venv/bin/python benchmarks/llm7b.py --pin-store    # S3 groups: the store on core 1, the runs on core 0
    .venv/bin/python benchmarks/llm7b.py --smoke        # shrunk widths: checks the script, measures nothing

Inputs: a base and 2 checkpoints shaped like Llama-2-7B (``LlamaForCausalLM``: hidden 4096,
intermediate 11008, vocab 32000, 32 heads, no grouped-query attention, untied ``lm_head``;
``--layers`` of its 32 decoder layers), random weights (``compare._base_tensor`` plus
``compare._delta(..., "dense")``, as the Llama-1B suites), bfloat16, written tensor by tensor
through mergeflow's ``ShardedWriter`` into HF folders: 5 GB shards
(``model-0000x-of-0000y.safetensors`` and ``model.safetensors.index.json``, or one
``model.safetensors`` below 5 GB) and a ``config.json``. Nothing whole is held in memory.

``--layers`` (default 6, what runs within the hour on 2 cores) is capped by the free disk of the work folder, checked first:
the inputs (3 x bf16), the largest run's float32 states (the previous and the new state of
a fold: 2 x 4 bytes per parameter, about 54 GB at full size), the spool (one 5 GB output
shard, or two 1 GiB state shards: the one written and the one being stored), the S3
copies of the inputs with ``--s3-inputs``, and 2 GiB to spare. Each run's output is deleted
once it is counted, and each S3 run has its own SeaweedFS whose data is deleted after it.

Runs, one process each under ``/usr/bin/time -v``, one round, in this order:

* ``reading baseline (local)``: read each fold's inputs once (base, checkpoint, previous
  output), write its output once as float32 (what a float32 state moves), then read base and
  last output and write the bf16 model: the storage limit of ``mergeflow merge``;
* ``mergeflow merge`` with ``task_arithmetic``, ``batch_task_arithmetic`` (the counterpart
  of mergekit's one-shot merge) and ``opcm`` (2 checkpoints: the second fold projects 225
  matrices at full size, ``lm_head`` included, as ``config.json`` makes it an ``nn.Linear``);
* ``mergekit task_arithmetic`` (mergekit 0.1.5 in ``benchmarks/.venv-mergekit``, created
  by ``compare._mk_python``; weight 0.3 per checkpoint, 100M output shards as in compare.py);
* against a local SeaweedFS (``mergeflow.services.s3_server``, started here on free ports,
  state in ``s3://llm7b/...``; inputs read from the local disk unless ``--s3-inputs``):
  ``reading baseline (S3 state)`` one process per fold, then ``mergeflow state init`` and
  one ``mergeflow state fold`` per checkpoint, for ``task_arithmetic`` and ``opcm``.

Reported per run: process wall seconds (and per fold), peak RSS (``/usr/bin/time -v``), and
bytes from this process's ``/proc/self/io`` before and after the run: a reaped child's
counters (and its own reaped children's, through ``/usr/bin/time``) are added to its
parent's, so the difference is exactly the run's. ``rchar``/``wchar`` count every byte
through read/write system calls, page-cache hits included: the bytes the run moved, whether
or not the disk saw them (at a few layers every input sits in the page cache, where
``read_bytes`` is about 0). ``read_bytes``/``write_bytes`` (net of ``cancelled_write_bytes``)
are what reached the block layer. Neither counts socket traffic (``recv``/``send``) nor
mmapped reads (mergekit reads safetensors by mmap: its rchar misses its inputs), so the S3
rows add the loopback interface's bytes (``/proc/net/dev``, received on ``lo``), halved:
``weed mini`` relays every body once more over loopback (its S3 gateway to its volume
server: a 200 MB upload, its download and a 50 MB ranged GET each put 2.0x their size on
``lo``); other loopback traffic on the machine is included, its rate sampled and printed.

Goals checked and printed: peak RSS of every mergeflow run ≤ 1 GiB + 8 x the largest
tensor in float32 (computed from the layout: ``lm_head``/``embed_tokens``, 32000 x 4096),
whatever the number of checkpoints; task-arithmetic folds at ≥ 70 % of the reading baseline's
throughput (local: ``merge`` against the local baseline; S3: the two ``state fold``
processes against the two S3 baseline processes). Then an estimate of the 32-layer run:
each row scaled by the parameter count, except the projected OPCM runs, scaled by the
projection work ``m·n² + 2·n³`` per matrix (Gram and ``eigh``; the split measured on
4096x4096 and 11008x4096 with ``linalg.project`` on this machine).

Everything is under ``benchmarks/_work/llm7b/`` (spools too: ``TMPDIR`` points there) and
is deleted at the end, on failure too, unless ``--keep`` (which keeps the built inputs,
reused by the next run with the same layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import compare  # benchmarks/compare.py (this folder is on sys.path when run as a script)
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "llm7b"
GB = 10**9
GiB = 2**30
FULL_LAYERS = 32
CHECKPOINTS = 2
SCALE = 0.3  # task arithmetic's weight per checkpoint, mergeflow's default and mergekit's here
BUCKET = "llm7b"
HOUR_LAYERS = 6
"""The default layer count: what runs within the hour on 2 cores (3 layers took 23 minutes on
2 vCPUs on 2026-12-07, 6 took the time in benchmarks/README.md); ``--layers 32`` is the full
size (about 3 hours there, and about 100 GB of disk)."""
GROUPS = ("local", "s3-baseline", "s3-task_arithmetic", "s3-opcm")
"""What ``--only`` may name: the local runs (mergekit's included), and each S3 group."""
EXTRA_SPARE = 2 * GiB
PIN_CLIENT: list[str] = []
"""``--pin-store``: the measured runs' command prefix (``taskset -c 0``)."""


@dataclass(frozen=True)
class Shape:
    """Widths of the Llama layout."""

    d: int = 4096
    ff: int = 11008
    vocab: int = 32000
    heads: int = 32


FULL = Shape()
SMOKE = Shape(d=256, ff=688, vocab=1000, heads=4)


def llama_7b(layers: int, s: Shape = FULL) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-2-7B-shaped LlamaForCausalLM with ``layers`` layers."""
    return compare.llama_1b(layers=layers, d=s.d, ff=s.ff, kv=s.d, vocab=s.vocab)  # no GQA


def hf_config(layers: int, s: Shape = FULL) -> dict[str, Any]:
    """Llama-2-7B's config.json with ``layers`` layers (mergekit and OPCM's projection read it)."""
    from transformers import LlamaConfig

    d = LlamaConfig(
        hidden_size=s.d,
        intermediate_size=s.ff,
        num_hidden_layers=layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        vocab_size=s.vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ).to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = "bfloat16"
    return d


def n_params(layout: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in layout.values())


def largest_f32(layout: dict[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...], int]:
    """The largest tensor's name, shape and size in float32 bytes."""
    name = max(layout, key=lambda k: math.prod(layout[k]))
    return name, layout[name], 4 * math.prod(layout[name])


def rss_bound(layout: dict[str, tuple[int, ...]]) -> int:
    """The goal: 1 GiB + 8 x the largest tensor in float32, in bytes."""
    return GiB + 8 * largest_f32(layout)[2]


def projection_work(layout: dict[str, tuple[int, ...]]) -> float:
    """OPCM's projected fold, in units of ``m·n² + 2·n³`` (tall side m) per projected matrix.

    Measured single-threaded under load on this machine with ``linalg.project``: 47 s for
    4096x4096, 74 s for 11008x4096, which this model splits as 16 s + 31 s and 43 s + 31 s.
    """
    w = 0.0
    for k, shape in layout.items():
        if len(shape) == 2 and "embed_tokens" not in k:  # nn.Linear weights, lm_head included
            m, n = max(shape), min(shape)
            w += m * n * n + 2 * n**3
    return w


def disk_need(layers: int, s: Shape, shard: int, s3_inputs: bool) -> int:
    """Bytes of free disk a run needs at ``layers`` (see the module doc)."""
    p = n_params(llama_7b(layers, s))
    model, state = 2 * p, 4 * p
    inputs = (CHECKPOINTS + 1) * model
    from mergeflow.storage.states import DEFAULT_SHARD  # the state shards: 2 in the spool

    spool = max(min(shard, state), 2 * min(DEFAULT_SHARD, state))
    return inputs * (2 if s3_inputs else 1) + 2 * state + spool + EXTRA_SPARE


def choose_layers(
    asked: int | None, s: Shape, shard: int, s3_inputs: bool, free: int
) -> tuple[int, str]:
    """The layer count and why."""
    want = asked if asked is not None else HOUR_LAYERS
    fit = 0
    while fit < FULL_LAYERS and disk_need(fit + 1, s, shard, s3_inputs) <= free:
        fit += 1
    need = disk_need(want, s, shard, s3_inputs)
    if need <= free:
        why = "as asked" if asked is not None else f"the default, {HOUR_LAYERS}"
        return want, f"{why}: needs {need / GB:.1f} GB of disk, {free / GB:.1f} GB free"
    if fit == 0:
        raise SystemExit(
            f"not even 1 layer fits: it needs {disk_need(1, s, shard, s3_inputs) / GB:.1f} GB "
            f"of disk, {free / GB:.1f} GB free"
        )
    return fit, (
        f"{want} layers need {need / GB:.1f} GB of disk and {free / GB:.1f} GB are free: "
        f"capped at {fit} ({disk_need(fit, s, shard, s3_inputs) / GB:.1f} GB)"
    )


# ------------------------------------------------------------------------------- inputs


def build(
    folder: Path, layout: dict[str, tuple[int, ...]], config: dict[str, Any], shard: int
) -> list[Path]:
    """Write base/, ckpt_0/, ckpt_1/ as HF folders, tensor by tensor (reused when complete)."""
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.shard_writer import ShardedWriter

    names = ["base", *(f"ckpt_{i}" for i in range(CHECKPOINTS))]
    dirs = [folder / n for n in names]
    spec = {"layout": list(layout.items()), "config": config, "shard": shard}
    marker = folder / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        print("reusing the inputs built before", flush=True)
        return dirs
    marker.unlink(missing_ok=True)
    for i, d in enumerate(dirs):
        shutil.rmtree(d, ignore_errors=True)
        w = ShardedWriter(StoreSink(LocalStore(d)), max_shard_size=shard)
        g = torch.Generator().manual_seed(100 + i)
        for k, shape in layout.items():
            t = compare._base_tensor(k, shape)
            if i > 0:
                t += compare._delta(shape, "dense", i - 1, g)
            w.add(k, t.to(torch.bfloat16))
            del t
        w.commit({"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
        print(f"  built {d.name}: {_du(d) / GB:.2f} GB, {sorted(os.listdir(d))}", flush=True)
    marker.write_text(json.dumps(spec))
    return dirs


# ------------------------------------------------------------------------------ drivers
# Each runs in its own process and prints one JSON line {"seconds": ...}.


def drive_reading(
    out: str, base: str, start: int, cks: list[str], export: bool, shard: int
) -> None:
    """Read each fold's inputs once (base, checkpoint, previous output) and write its output
    once in float32, as a state is written (its shard size, each shard stored while the next
    is written); ``export``: then read base and last output, write the model in ``shard``s.

    compare.drive_reading's reads the previous output as one ``model.safetensors``; this one
    opens it as a folder (sharded at 7B size) in a local folder or an S3 prefix, and drops
    it after the next is written, as a fold drops the state it replaced.
    """
    from mergeflow.storage.objects import StoreSink
    from mergeflow.storage.schemes import open_checkpoint, open_store
    from mergeflow.storage.shard_writer import ShardedWriter
    from mergeflow.storage.states import DEFAULT_SHARD

    t0 = time.perf_counter()
    store = open_store(out)
    b = open_checkpoint(base).reader
    for j, ck in enumerate(cks):
        i = start + j
        c = open_checkpoint(ck).reader
        p = open_checkpoint(f"{out}/step{i - 1}").reader if i else None
        w = ShardedWriter(StoreSink(store, f"step{i}"), DEFAULT_SHARD, background=True)
        for k in b.keys():
            b.get(k)
            t = c.get(k)
            if p is not None:
                p.get(k)
            w.add(k, t.float() if t.is_floating_point() else t)
            del t
        w.commit()
        if i:
            store.delete_prefix(f"step{i - 1}")
    if export:
        last = open_checkpoint(f"{out}/step{start + len(cks) - 1}").reader
        w = ShardedWriter(StoreSink(store, "model"), max_shard_size=shard)
        for k in b.keys():
            w.add(k, last.get(k).to(b.get(k).dtype))
        w.commit()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def drive_upload(src: str, dst: str) -> None:
    """Put every file of the local folder ``src`` under the store URI ``dst``."""
    from mergeflow.storage.schemes import open_store

    t0 = time.perf_counter()
    store = open_store(dst)
    root = Path(src)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            store.put_file(f, str(f.relative_to(root)))
    print(json.dumps({"seconds": time.perf_counter() - t0}))


# ---------------------------------------------------------------------- running systems

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")


def _proc_io() -> dict[str, int]:
    """This process's /proc/self/io (reaped children included)."""
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = int(v)
    return out


def _lo_bytes() -> int:
    """Bytes received on the loopback interface so far (each packet on lo is received once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


@dataclass
class Row:
    """One measured run."""

    name: str
    group: str
    seconds: float = math.nan
    folds: int = 1
    rss_mib: float = math.nan
    io: dict[str, int] = field(default_factory=dict)
    lo: int | None = None
    load: float = math.nan
    note: str = ""
    failed: str = ""
    mergeflow: bool = True
    projected: bool = False  # an OPCM run with a projected fold (for the full-size estimate)


def run_measured(
    row: Row, cmd: list[str], env: dict[str, str], check: Callable[[], str] | None = None
) -> Row:
    """Run ``cmd`` under /usr/bin/time -v in its own process group (killed with us): wall
    seconds, peak RSS, the /proc/self/io difference and, for S3 rows, loopback bytes."""
    row.load = os.getloadavg()[0]
    io0, lo0 = _proc_io(), _lo_bytes()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", *PIN_CLIENT, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    row.seconds = time.perf_counter() - t0
    io1, lo1 = _proc_io(), _lo_bytes()
    row.io = {k: io1.get(k, 0) - io0.get(k, 0) for k in IO_KEYS}
    if row.group.startswith("S3"):
        row.lo = lo1 - lo0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    row.rss_mib = int(m.group(1)) / 1024 if m else math.nan
    if proc.returncode != 0:
        said = err.split("Command exited with non-zero status")[0].split("\tCommand being timed")[0]
        row.failed = f"exit {proc.returncode}: " + (said.strip().splitlines() or [""])[-1][:200]
        print(f"  {row.name} FAILED ({proc.returncode}):\n{err[-3000:]}\n{out[-1000:]}", flush=True)
        return row
    if check is not None:
        row.failed = check()
    print(
        f"  {row.name}: {row.seconds:.1f} s, peak RSS {row.rss_mib:.0f} MiB, "
        f"rchar {row.io['rchar'] / GB:.2f} GB, wchar {row.io['wchar'] / GB:.2f} GB"
        + (f", lo {row.lo / GB:.2f} GB" if row.lo is not None else "")
        + f" (load {row.load:.1f})"
        + (f"  CHECK FAILED: {row.failed}" if row.failed else ""),
        flush=True,
    )
    return row


def _reap(pid: int) -> None:
    """Collect a stopped server's exit status now. A reaped child's IO counters join this
    process's, so a server reaped later (by the next Popen's clean-up of exited children)
    would put its bytes into the next run's measurement."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _self(driver: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--driver", driver, *args]


def _mf(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergeflow", *args]


def _du(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _count_check(out: Path, expected: int) -> Callable[[], str]:
    """An exit code 0 that merged nothing is no timing: the output must hold every tensor."""

    def check() -> str:
        got = compare._tensor_count(out) if out.exists() else 0
        return "" if got == expected else f"wrote {got} of {expected} tensors"

    return check


def mergekit_cmd(base: Path, cks: list[Path], out: Path) -> list[str]:
    """mergekit-yaml task_arithmetic over the HF folders (compare._mergekit_cmd's settings)."""
    body = "".join(
        f"  - model: {c}\n    parameters:\n      weight: {SCALE}\n" for c in cks
    )  # mergekit: θ₀ + Σ w_i τ_i, the same as mergeflow's scale 0.3
    cfg = out.parent / "mk-task_arithmetic.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{body}"
        "parameters:\n  normalize: false\ndtype: bfloat16\n"
    )
    return compare.mergekit_argv(cfg, out)


# -------------------------------------------------------------------------------- report


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def print_report(
    rows: list[Row],
    layout: dict[str, tuple[int, ...]],
    full_layout: dict[str, tuple[int, ...]],
    build_s: float,
    lo_rate: float,
) -> None:
    bound = rss_bound(layout)
    print(
        "\n| run | s (process wall) | s per fold | peak RSS MiB | ≤ bound | rchar GB | wchar GB "
        "| disk read GB | disk written GB | S3 ≈ GB (loopback / 2) | load | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.failed and math.isnan(r.seconds):
            print(f"| {r.name} | FAILED | | | | | | | | | | {r.failed} |")
            continue
        ok = "-" if not r.mergeflow else ("yes" if r.rss_mib * 2**20 <= bound else "**NO**")
        io = r.io
        print(
            f"| {r.name} | {r.seconds:.1f} | {r.seconds / r.folds:.1f} | {r.rss_mib:.0f} | {ok} "
            f"| {_gb(io.get('rchar'))} | {_gb(io.get('wchar'))} | {_gb(io.get('read_bytes'))} "
            f"| {_gb(io.get('write_bytes', 0) - io.get('cancelled_write_bytes', 0))} "
            f"| {_gb(None if r.lo is None else r.lo // 2)} | {r.load:.1f} | "
            + "; ".join(x for x in (r.note, f"FAILED: {r.failed}" if r.failed else "") if x)
            + " |"
        )
    if any(r.lo is not None for r in rows):
        print(
            "\nS3 GB: bytes received on lo, halved: weed mini relays each body once more over "
            "loopback (its S3 gateway to its volume server; a 200 MB upload, download and "
            "50 MB ranged GET each put 2.0x their size on lo). Other loopback traffic on this "
            f"machine, sampled before the S3 runs: {lo_rate / 1e6:.3f} MB/s (included)."
        )
    name, shape, nbytes = largest_f32(layout)
    print(
        f"\nGoal 1: peak RSS ≤ 1 GiB + 8 x the largest tensor in float32 ({name} "
        f"{shape[0]}x{shape[1]}: {nbytes:,} B) = {bound:,} B = {bound / GiB:.3f} GiB "
        f"= {bound / 2**20:.0f} MiB ({bound / GB:.2f} GB)"
    )
    by = {r.name: r for r in rows}
    for r in rows:
        if r.mergeflow and not math.isnan(r.rss_mib):
            verdict = "met" if r.rss_mib * 2**20 <= bound else "NOT met"
            print(f"  {r.name}: {r.rss_mib:.0f} MiB, {r.rss_mib * 2**20 / bound:.0%}: {verdict}")
    print("\nGoal 2: task-arithmetic folds at ≥ 70 % of the reading baseline's throughput")

    def ratio(label: str, base_names: list[str], names: list[str]) -> None:
        b = [by.get(n) for n in base_names]
        t = [by.get(n) for n in names]
        if any(x is None or x.failed or math.isnan(x.seconds) for x in [*b, *t]):
            print(f"  {label}: not measured (a run failed or was skipped)")
            return
        sb = sum(x.seconds for x in b if x is not None)
        st = sum(x.seconds for x in t if x is not None)
        verdict = "met" if sb / st >= 0.70 else "NOT met"
        print(f"  {label}: {sb:.1f} s baseline / {st:.1f} s = {sb / st:.0%}: {verdict}")

    ratio(
        "local, mergeflow merge (2 folds + export) vs reading baseline (local)",
        ["reading baseline (local): 2 folds + export"],
        ["mergeflow merge task_arithmetic"],
    )
    ratio(
        "S3 state, mergeflow state fold x2 vs reading baseline (S3 state) x2",
        [f"reading baseline (S3 state): fold {i + 1}" for i in range(CHECKPOINTS)],
        [f"mergeflow state fold task_arithmetic: fold {i + 1}" for i in range(CHECKPOINTS)],
    )
    # the full-size estimate
    p_ratio = n_params(full_layout) / n_params(layout)
    w_ratio = projection_work(full_layout) / projection_work(layout)
    total = build_s * p_ratio
    for r in rows:
        if not math.isnan(r.seconds):
            total += r.seconds * (w_ratio if r.projected else p_ratio)
    print(
        f"\nEstimate of the {FULL_LAYERS}-layer run: rows scaled by the parameters "
        f"({p_ratio:.1f}x), the projected OPCM runs by the projection work ({w_ratio:.1f}x): "
        f"about {total / 3600:.1f} h (build {build_s * p_ratio / 60:.0f} min). A lower bound "
        "for the IO: at full size the 40 GB of inputs do not fit in the page cache."
    )


# ---------------------------------------------------------------------------------- main


def _child_env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION")
        and not k.startswith("MERGEFLOW_S3_")
    }
    env |= {"TMPDIR": str(work / "tmp"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["MERGEFLOW_HOME"] = str(work / "home")  # its digest cache starts empty in every run
    return env | (extra or {})


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--layers",
        type=int,
        help=f"decoder layers (default {HOUR_LAYERS}: the hour on 2 cores; 32 is the full size), capped by disk",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder's built inputs")
    ap.add_argument(
        "--s3-inputs", action="store_true", help="S3 runs read base and checkpoints from S3"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="shrunk widths, small shards: checks the script"
    )
    ap.add_argument(
        "--shard-size",
        help="input and output model shards (default 5GB); states use mergeflow's (1 GiB)",
    )
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument(
        "--pin-store",
        action="store_true",
        help="S3 groups: the store's threads on core 1, the measured runs on core 0 (as if the "
        "store were another machine's)",
    )
    ap.add_argument(
        "--only",
        help=f"comma-separated groups to run (default all): {', '.join(GROUPS)}",
    )
    ap.add_argument("--work", type=Path, default=WORK, help=argparse.SUPPRESS)
    ap.add_argument("--driver", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.driver == "reading":  # OUT BASE START SHARD EXPORT CK...
        drive_reading(rest[0], rest[1], int(rest[2]), rest[5:], rest[4] == "1", int(rest[3]))
        return
    if args.driver == "upload":
        drive_upload(rest[0], rest[1])
        return
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be at least 1")
    groups = GROUPS if not args.only else tuple(g.strip() for g in args.only.split(","))
    if args.pin_store and (os.cpu_count() or 1) < 2:
        ap.error("--pin-store needs 2 cores")
    if unknown := [g for g in groups if g not in GROUPS]:
        ap.error(f"--only: unknown group(s) {', '.join(unknown)}; groups: {', '.join(GROUPS)}")
    from mergeflow.cli.args import parse_size

    shape = SMOKE if args.smoke else FULL
    shard = parse_size(args.shard_size or ("1MB" if args.smoke else "5GB"))
    signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"load {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        flush=True,
    )
    if not args.skip_mergekit and "local" in groups:
        compare._mk_python()  # before the disk check: creating the venv takes some disk
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    reusable = sum(_du(work / n) for n in ("base", "ckpt_0", "ckpt_1") if (work / n).exists())
    free = shutil.disk_usage(work).free + reusable
    layers, why = choose_layers(args.layers, shape, shard, args.s3_inputs, free)
    layout = llama_7b(layers, shape)
    full_layout = llama_7b(FULL_LAYERS, shape)
    p = n_params(layout)
    print(
        f"layers: {layers} of {FULL_LAYERS} ({why}); {p / 1e9:.3f} B parameters "
        f"({n_params(full_layout) / 1e9:.3f} B at {FULL_LAYERS}), {len(layout)} tensors, "
        f"{2 * p / GB:.2f} GB per bf16 model, {4 * p / GB:.2f} GB per float32 state; "
        f"shards of {shard / GB:g} GB",
        flush=True,
    )
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    tempfile.tempdir = str(tmp)  # the builder's spools
    rows: list[Row] = []
    servers: list[Any] = []
    build_s = math.nan
    ok = False
    try:
        t0 = time.perf_counter()
        base, ck0, ck1 = build(work, layout, hf_config(layers, shape), shard)
        build_s = time.perf_counter() - t0
        cks = [ck0, ck1]
        print(f"inputs ready in {build_s:.0f} s", flush=True)
        shutil.rmtree(work / "home", ignore_errors=True)  # each checkpoint is hashed once, as new
        env = _child_env(work)
        out = work / "out"
        shard_arg = str(shard)
        common = ["--base", str(base), "--out"]
        tail = ["--device", "cpu", "--no-progress", "--overwrite", "--max-shard-size", shard_arg]
        n = len(layout)

        def local(row: Row, cmd: list[str], dest: Path | None) -> None:
            if "local" not in groups:
                return
            check = _count_check(dest, n) if dest is not None else None
            rows.append(run_measured(row, cmd, env, check))
            shutil.rmtree(out, ignore_errors=True)  # bound the disk: outputs go once counted

        if "local" in groups:
            print("\n== local runs ==", flush=True)
        local(
            Row(
                "reading baseline (local): 2 folds + export",
                "local",
                folds=CHECKPOINTS,
                mergeflow=False,
                note="float32 outputs as a state, then the bf16 model",
            ),
            _self("reading", str(out / "read"), str(base), "0", shard_arg, "1", *map(str, cks)),
            out / "read" / "model",
        )
        local(
            Row(
                "mergeflow merge task_arithmetic",
                "local",
                folds=CHECKPOINTS,
                note="2 folds + export, one process",
            ),
            _mf("merge", *common, str(out / "ta"), "--method", "task_arithmetic", *tail)
            + [str(c) for c in cks],
            out / "ta",
        )
        local(
            Row(
                "mergeflow merge batch_task_arithmetic",
                "local",
                note="one pass; no task-vector ratio screen (mergekit has none)",
            ),
            _mf(
                "merge",
                *common,
                str(out / "bta"),
                "--method",
                "batch_task_arithmetic",
                "--max-task-vector-ratio",
                "none",
                *tail,
            )
            + [str(c) for c in cks],
            out / "bta",
        )
        if not args.skip_mergekit:
            (out).mkdir(parents=True, exist_ok=True)
            local(
                Row(
                    "mergekit task_arithmetic",
                    "local",
                    mergeflow=False,
                    note="mergekit 0.1.5, one pass, 100M shards; RSS counts mmapped inputs, "
                    "rchar misses them",
                ),
                mergekit_cmd(base, cks, out / "mk-ta"),
                out / "mk-ta",
            )
        local(
            Row(
                "mergeflow merge opcm",
                "local",
                folds=CHECKPOINTS,
                note="2 folds (the 2nd projected) + export, one process",
                projected=True,
            ),
            _mf("merge", *common, str(out / "opcm"), "--method", "opcm", *tail)
            + [str(c) for c in cks],
            out / "opcm",
        )

        from mergeflow.services.s3_server import ObjectStoreServer

        lo_a = _lo_bytes()
        time.sleep(5)
        lo_rate = (_lo_bytes() - lo_a) / 5
        where = "from S3" if args.s3_inputs else "from the local disk"
        if args.pin_store:
            PIN_CLIENT[:] = ["taskset", "-c", "0"]
            print("S3 groups pinned: the store on core 1, the measured runs on core 0", flush=True)
        for what in [g.removeprefix("s3-") for g in groups if g.startswith("s3-")]:
            print(f"\n== S3: {what} (inputs read {where}) ==", flush=True)
            data = work / f"s3-{what}"
            server = ObjectStoreServer(data, port=None)
            servers.append(server)
            server.start()
            if args.pin_store:  # every thread of the store on core 1, the runs on core 0
                subprocess.run(["taskset", "-a", "-p", "-c", "1", str(server.pid)], check=True)
            server.ensure_bucket(BUCKET)
            s3env = env | server.env()
            inputs = [str(base), *map(str, cks)]
            if args.s3_inputs:
                names = ["base", *(f"ckpt_{i}" for i in range(CHECKPOINTS))]
                for d, nm in zip([base, *cks], names, strict=True):
                    rows.append(
                        run_measured(
                            Row(f"upload {nm} to S3 ({what})", "S3 upload", mergeflow=False),
                            _self("upload", str(d), f"s3://{BUCKET}/inputs/{nm}"),
                            s3env,
                        )
                    )
                inputs = [f"s3://{BUCKET}/inputs/{nm}" for nm in names]
            state = f"s3://{BUCKET}/{what}"
            if what == "baseline":
                for i in range(CHECKPOINTS):
                    rows.append(
                        run_measured(
                            Row(
                                f"reading baseline (S3 state): fold {i + 1}",
                                "S3",
                                mergeflow=False,
                                note="float32 output in S3, the previous one dropped",
                            ),
                            _self(
                                "reading", state, inputs[0], str(i), shard_arg, "0", inputs[i + 1]
                            ),
                            s3env,
                        )
                    )
            else:
                rows.append(
                    run_measured(
                        Row(f"mergeflow state init {what}", "S3", note="reads the base's header"),
                        _mf("state", "init", "--state", state, "--base", inputs[0])
                        + ["--method", what],
                        s3env,
                    )
                )
                for i in range(CHECKPOINTS):
                    proj = what == "opcm" and i > 0
                    rows.append(
                        run_measured(
                            Row(
                                f"mergeflow state fold {what}: fold {i + 1}",
                                "S3",
                                note="projected" if proj else "",
                                projected=proj,
                            ),
                            _mf("state", "fold", "--state", state, "--base", inputs[0])
                            + ["--device", "cpu", "--no-progress"]
                            + [inputs[i + 1]],
                            s3env,
                        )
                    )
            pid = server.pid
            server.stop(grace=2.0)
            servers.remove(server)
            if pid is not None:
                _reap(pid)
            shutil.rmtree(data, ignore_errors=True)
        print_report(rows, layout, full_layout, build_s, lo_rate)
        load1 = os.getloadavg()
        print(
            f"\ntotal {time.perf_counter() - t_start:.0f} s; load at the end "
            f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}",
            flush=True,
        )
        ok = True
    finally:
        for server in servers:
            server.stop(grace=2.0)
        if args.keep:
            for child in work.iterdir():
                if child.name in ("base", "ckpt_0", "ckpt_1", "spec.json"):
                    continue
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
            print(f"kept the inputs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}" + ("" if ok else " (after a failure)"))


if __name__ == "__main__":
    main()
