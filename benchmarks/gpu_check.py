"""GPU check (issue 21): what one lent GPU must tell us, in one run of at most 8 minutes.

Run from the repository root::

    .venv/bin/python benchmarks/gpu_check.py             # CUDA: the full check; no CUDA: reduced
    .venv/bin/python benchmarks/gpu_check.py --reduced   # the reduced mode (tiny shapes), anywhere
    .venv/bin/python benchmarks/gpu_check.py --out FILE  # default benchmarks/results/gpu_check.md
                                                         # (reduced: gpu_check_reduced.md)
    .venv/bin/python benchmarks/gpu_check.py --methods opcm,dop --parts agreement   # a subset

On the device machine (its image has torch, safetensors, numpy, tqdm and threadpoolctl but no
pydantic; carry its wheels, benchmarks/README.md "GPU check" says how)::

    PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --reduced --out $OUT/reduced.md \\
      && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --out $OUT/gpu_check.md

Parts, each with its own time budget (an item that would start after its part's budget or
the whole run's is skipped, and its row says so), in one markdown table:

* ``agreement``: every continual and batch method of the registry
  (``mergeflow.merging.methods.METHODS``) with its default parameters (``dop`` and
  ``nufilt`` with fewer Adam steps: the rows say how many) folds 2 checkpoints of the ViT-B/32 fixture
  (``compare.py``'s layout and builders) on the candidate device and on the reference, the
  way ``mergeflow state fold`` / ``state export`` and ``mergeflow merge`` run it; the worst
  per-tensor ``‖θ_cand − θ_ref‖ / ‖θ_ref − θ₀‖`` of the merged models (``compare._worst_error``).
  Methods that need statistics or calibration data, and pool methods, are listed as skipped.
* ``folds``: seconds per fold of ``task_arithmetic`` and ``opcm`` over 2 checkpoints (fold 2
  is OPCM's first projected fold) on the device, for ViT-B/32 and for Llama-2-7B shapes
  (hidden 4096, intermediate 11008, vocab 32000, bfloat16; ``--llama-layers`` of its 32
  layers, fewer when the disk is short), with the peak GPU memory of each.
* ``latency``: the fold and export phases of publish -> registered at ViT-B/32 size (an OPCM
  fold of the second checkpoint, then the export). ``benchmarks/latency.py`` measures the
  whole path, but it needs the embedded stack (Prefect, MLflow, SeaweedFS), which the device
  image lacks, and its lineage folds on device cpu, so only these two phases are measured here.

Candidate and reference: with CUDA, cuda vs cpu (both float32). Without CUDA (the reduced mode
by default), cpu float32 vs cpu float64 stands in for it, and the folds run on the cpu. The
reduced mode runs the same functions on tiny shapes (a 1-layer ViT of width 64, a 1-layer
Llama of width 64), so ``tests/test_gpu_check.py`` keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("mergeflow") is None:  # the device machine: the repo is not installed
    sys.path.insert(0, str(REPO))

import compare  # noqa: E402  (benchmarks/compare.py: the fixtures' layouts and builders)

from mergeflow.merging.methods import METHODS, Method  # noqa: E402

PARTS = ("agreement", "folds", "latency")
CHECKPOINTS = 2
"""Checkpoints per merge: the second fold is OPCM's first projected one."""
FEWER_STEPS = {"dop": 10, "nufilt": 20}
"""Adam steps of the optimising methods in the agreement (defaults 200 per matrix and 50 per
fold: the cpu side would take minutes at ViT-B/32 size); the rows say so."""
SLOW = frozenset(FEWER_STEPS)
LLAMA_LAYERS = 4
"""Llama-2-7B layers in the full mode by default: build and 4 folds fit the folds budget."""

# ----------------------------------------------------------------------------- layouts


def llama2_7b(
    layers: int = 32, d: int = 4096, ff: int = 11008, vocab: int = 32000
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM, Llama-2-7B by default (no grouped KV)."""
    return compare.llama_1b(layers=layers, d=d, ff=ff, kv=d, vocab=vocab)


_LAYOUTS: dict[str, dict[str, tuple[int, ...]]] = {}


def _layout_of(name: str, _orig: Callable[[str], dict[str, tuple[int, ...]]] = compare.layout_of):
    return _LAYOUTS[name] if name in _LAYOUTS else _orig(name)


def register_suite(
    suite: str, layout: dict[str, tuple[int, ...]], dtype: str, deltas: str
) -> tuple[Path, list[Path]]:
    """Add a suite of ``CHECKPOINTS`` checkpoints to compare.py's and build it with its
    ``build`` (cached under ``compare.WORK``); ``layout`` is this script's, named by the suite."""
    _LAYOUTS[suite] = layout
    compare.layout_of = _layout_of  # compare.build resolves layouts through this name
    compare.SUITES[suite] = {"layout": suite, "dtype": dtype, "n": CHECKPOINTS, "deltas": deltas}
    return compare.build(suite)


def n_params(layout: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in layout.values())


# ------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Sizes, devices and budgets of one run (:func:`make_plan`)."""

    mode: str  # "full" or "reduced"
    candidate: tuple[str, str]  # (device, compute dtype) under test
    reference: tuple[str, str]  # what it is compared with
    vit: dict[str, tuple[int, ...]]
    vit_label: str
    llama: dict[str, tuple[int, ...]]
    llama_label: str
    budgets: dict[str, float]  # part -> seconds
    total: float  # seconds for the whole run
    needs: dict[str, tuple[float, float]]
    """Item kind -> (seconds, seconds per 100 M parameters) an item needs to be started."""
    notes: list[str] = field(default_factory=list)

    def need(self, kind: str, layout: Mapping[str, tuple[int, ...]]) -> float:
        """Seconds an item of ``kind`` on a model of ``layout`` needs about."""
        fixed, per = self.needs[kind]
        return fixed + per * n_params(layout) / 1e8

    @property
    def device(self) -> str:
        """Where the timed folds run."""
        return self.candidate[0]


def make_plan(mode: str, llama_layers: int, work: Path) -> Plan:
    """The full plan (ViT-B/32, Llama-2-7B shapes) or the reduced one (tiny shapes)."""
    cuda = torch.cuda.is_available()
    candidate = ("cuda", "float32") if cuda else ("cpu", "float32")
    reference = ("cpu", "float32") if cuda else ("cpu", "float64")
    notes = []
    if not cuda:
        notes.append(
            "no CUDA: cpu float32 against cpu float64 stands in for cuda against cpu; it "
            "measures the compute dtype, not the device"
            + (
                " (nufilt at width 64: its null_r of 128 spans the whole width, so its rank "
                "cut σ > σ₁·max(o, d)·ε, which follows the dtype's ε, decides the result)"
                if mode == "reduced"
                else ""
            )
        )
    if mode == "reduced":
        return Plan(
            mode=mode,
            candidate=candidate,
            reference=reference,
            vit=compare.clip_vit_b32(layers=1, d=64, ff=128),
            vit_label="vit-tiny (1 layer, d 64)",
            llama=llama2_7b(layers=1, d=64, ff=172, vocab=256),
            llama_label="llama-tiny (1 layer, d 64, bf16)",
            budgets={"agreement": 60.0, "folds": 40.0, "latency": 20.0},
            total=150.0,
            needs={k: (0.5, 0.0) for k in ("agree", "agree-slow", "fold", "build")},
            notes=notes,
        )
    layers = _llama_layers_for_disk(llama_layers, work)
    if layers < llama_layers:
        notes.append(f"Llama layers cut from {llama_layers} to {layers}: free disk")
    return Plan(
        mode=mode,
        candidate=candidate,
        reference=reference,
        vit=compare.clip_vit_b32(),
        vit_label="vit-b32",
        llama=llama2_7b(layers=layers),
        llama_label=f"llama-2-7b shapes ({layers} of 32 layers, bf16)",
        budgets={"agreement": 200.0, "folds": 170.0, "latency": 30.0},
        total=430.0,
        # about: ViT-B/32's merges on cuda + 16 cpu workers, its build; Llama's build (5 normal
        # draws per parameter) and 2 folds (a float32 state written each fold)
        needs={
            "agree": (10.0, 0.0),
            "agree-slow": (45.0, 0.0),
            "build": (5.0, 5.0),
            "fold": (5.0, 3.0),
        },
        notes=notes,
    )


def _llama_layers_for_disk(wanted: int, work: Path) -> int:
    """At most ``wanted`` layers whose inputs (base + checkpoints, bf16) and a float32 state
    written beside the previous one fit in 80 % of the free disk."""
    work.mkdir(parents=True, exist_ok=True)
    free = 0.8 * shutil.disk_usage(work).free

    def need(n: int) -> float:
        return n_params(llama2_7b(layers=n)) * (2 * (1 + CHECKPOINTS) + 2 * 4)

    layers = wanted
    while layers > 1 and need(layers) > free:
        layers -= 1
    return layers


# ----------------------------------------------------------------------------- running


@dataclass
class Row:
    part: str
    case: str
    result: str = "-"
    seconds: str = "-"
    peak: str = "-"
    note: str = ""
    failed: bool = False


class Clock:
    """The whole run's deadline and the current part's."""

    def __init__(self, total: float) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + total
        self.part_deadline = self.deadline
        self.part_budget = total

    def start_part(self, budget: float) -> float:
        now = time.perf_counter()
        self.part_budget = budget
        self.part_deadline = min(now + budget, self.deadline)
        return now

    def left(self) -> float:
        return self.part_deadline - time.perf_counter()

    def why_not(self, needs: float) -> str | None:
        """None when an item that needs about ``needs`` seconds may start, else the reason."""
        left = self.left()
        if left >= needs:
            return None
        whole = self.deadline - time.perf_counter() < needs
        what = "the run's" if whole else f"the part's {self.part_budget:.0f} s"
        return f"skipped: {what} budget is spent ({max(left, 0):.0f} s left, needs about {needs:.0f} s)"


def cpu_worker_count() -> int:
    """Fold workers of a cpu merge here: every core (the engine's default is at most 2)."""
    env = os.environ.get("MERGEFLOW_FOLD_WORKERS")
    return max(1, int(env)) if env else max(1, os.cpu_count() or 1)


@contextmanager
def cpu_workers(device: str) -> Iterator[None]:
    """:func:`cpu_worker_count` workers for a cpu merge (``MERGEFLOW_FOLD_WORKERS``; one
    thread each, so results do not depend on it); a GPU merge keeps the engine's 1 worker."""
    if device != "cpu" or "MERGEFLOW_FOLD_WORKERS" in os.environ:
        yield
        return
    os.environ["MERGEFLOW_FOLD_WORKERS"] = str(cpu_worker_count())
    try:
        yield
    finally:
        del os.environ["MERGEFLOW_FOLD_WORKERS"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class MergeRun:
    """Seconds of each fold (a batch merge: one entry), of the export, and the peak GPU bytes."""

    folds: list[float]
    export: float | None
    peak: int | None

    @property
    def seconds(self) -> float:
        return sum(self.folds) + (self.export or 0.0)


def merge_on(
    method: Method,
    params: Mapping[str, object],
    base: Path,
    cks: list[Path],
    out: Path,
    device: str,
    compute_dtype: str = "float32",
    export: bool = True,
) -> MergeRun:
    """Merge ``cks`` into ``base`` with ``method`` on ``device``, as the CLI and the fold task
    do: a continual method folds each checkpoint into a state on disk
    (``states.fold_into``) and exports the merged model (``states.export_state``) to
    ``out/model``; a batch method merges them there at once (``batch.batch_merge``)."""
    from mergeflow.architecture import resolve_projection
    from mergeflow.merging import batch, engine
    from mergeflow.merging.state import BaseRef, FoldOptions
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.storage.shard_writer import ShardedWriter

    shutil.rmtree(out, ignore_errors=True)
    options = FoldOptions(compute_dtype=compute_dtype)  # type: ignore[arg-type]
    b = open_checkpoint(str(base))
    model = ShardedWriter(StoreSink(LocalStore(out / "model")), max_shard_size=2**40)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    folds: list[float] = []
    seconds_export = None
    with cpu_workers(device):
        if method.kind == "batch":
            readers = [open_checkpoint(str(c), base=b.reader).reader for c in cks]
            t = time.perf_counter()
            batch.batch_merge(
                method.name, params, b.reader, readers, model, options=options, device=device
            )
            _sync(device)
            folds.append(time.perf_counter() - t)
        else:
            store = LocalStore(out / "state")
            info = engine.new_state(
                method.name,
                params,
                BaseRef(uri=str(base), digest="-"),
                resolve_projection(b.reader, None),
                options,
            )
            states.init_state(store, info)
            for i, ck in enumerate(cks):
                c = open_checkpoint(str(ck), base=b.reader)
                t = time.perf_counter()
                states.fold_into(
                    store, store, b.reader, c, checkpoint_id=f"c{i}", digest=f"d{i}", device=device
                )
                _sync(device)
                folds.append(time.perf_counter() - t)
            if export:
                t = time.perf_counter()
                states.export_state(store, b.reader, model, device=device)
                _sync(device)
                seconds_export = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return MergeRun(folds, seconds_export, peak)


def _mib(peak: int | None) -> str:
    return "-" if peak is None else f"{peak / 2**20:.0f}"


def warm_up(device: str) -> None:
    """Pay the one-time costs outside every timing: the first Adam step (torch imports its
    compiler stack, about 3 s) and, on a GPU, CUDA, cuBLAS and cuSOLVER."""
    for d in {"cpu", device}:
        p = torch.nn.Parameter(torch.zeros(4, device=d))
        p.grad = torch.ones_like(p)
        torch.optim.Adam([p], foreach=False).step()
    if device.startswith("cuda"):
        a = torch.randn(256, 256, device=device, dtype=torch.float64)
        torch.linalg.eigh(a @ a.T)
        torch.linalg.svd(a.float(), full_matrices=False)
        (a.float() @ a.float()).sum().item()
        torch.cuda.synchronize()


@contextmanager
def guarded(row: Row) -> Iterator[None]:
    """Run one item; an exception becomes the row's result and the run goes on."""
    try:
        yield
    except Exception as e:
        traceback.print_exc()
        first = str(e).splitlines()[0][:200] if str(e) else ""
        row.result = f"error: {type(e).__name__}: {first}"
        row.failed = True


def _label(side: tuple[str, str]) -> str:
    return side[0] if side[1] == "float32" else f"{side[0]} {side[1]}"


def skip_reason(m: Method) -> str | None:
    """Why the agreement leaves a registered method out (None: it runs)."""
    if m.kind == "pool":
        return "skipped: pool method (whole-model optimisation on calibration data)"
    stats = sorted(getattr(m, "statistics", ()))
    if stats:
        return f"skipped: needs statistics ({', '.join(stats)})"
    if getattr(m, "needs_objective", False):
        return "skipped: needs calibration data (an objective)"
    return None


def agreement_params(m: Method) -> tuple[dict[str, object], str]:
    """The agreement's parameters (the defaults, fewer steps where :data:`FEWER_STEPS` says)
    and the row's note."""
    if m.name in FEWER_STEPS:
        steps, default = FEWER_STEPS[m.name], m.Params.model_fields["steps"].default
        return {"steps": steps}, f"default parameters but {steps} Adam steps (default {default})"
    return {}, "default parameters"


def inputs_row(
    part: str, suite: str, layout: dict[str, tuple[int, ...]], label: str, dtype: str, deltas: str
) -> tuple[Row, tuple[Path, list[Path]] | None]:
    """Build (or find) a suite's base and checkpoints; the row says which and how long."""
    row = Row(part, f"{label}: inputs", note=f"{n_params(layout) / 1e6:.1f} M parameters, {dtype}")
    cached = (compare.WORK / suite / "spec.json").exists()
    files = None
    with guarded(row):
        t = time.perf_counter()
        files = register_suite(suite, layout, dtype, deltas)
        row.seconds = f"{time.perf_counter() - t:.1f}"
        row.result = "cached" if cached else "built"
    return row, files


def part_agreement(plan: Plan, clock: Clock, work: Path, methods: list[Method]) -> list[Row]:
    """Every continual and batch method on the candidate and the reference (module doc)."""
    built, files = inputs_row(
        "agreement", f"gpu-check-{plan.mode}-vit", plan.vit, plan.vit_label, "float32", "structured"
    )
    cand, ref = plan.candidate, plan.reference
    rows = {m.name: Row("agreement", m.name, note=m.kind) for m in methods}
    for m in sorted(methods, key=lambda m: m.name in SLOW):  # slow last: a spent budget skips few
        row = rows[m.name]
        needs = plan.need("agree-slow" if m.name in SLOW else "agree", plan.vit)
        reason = skip_reason(m) or clock.why_not(needs)
        if files is None:
            reason = reason or "skipped: no inputs"
        if reason:
            row.note += f"; {reason}"
            continue
        assert files is not None
        base, cks = files
        params, how = agreement_params(m)
        row.note += f"; {how}"
        if ref[0] == "cpu":
            row.note += f"; cpu: {cpu_worker_count()} workers"
        with guarded(row):
            a = merge_on(m, params, base, cks, work / "cand", *cand)
            r = merge_on(m, params, base, cks, work / "ref", *ref)
            worst = compare._worst_error(work / "cand" / "model", work / "ref" / "model", base)
            row.result = f"{worst:.2e}"
            row.seconds = f"{_label(cand)} {a.seconds:.2f}, {_label(ref)} {r.seconds:.2f}"
            row.peak = _mib(a.peak)
        for d in ("cand", "ref"):
            shutil.rmtree(work / d, ignore_errors=True)
    return [built, *(rows[m.name] for m in methods)]


def part_folds(plan: Plan, clock: Clock, work: Path) -> list[Row]:
    """Seconds per fold of task_arithmetic and opcm on the device, ViT-B/32 and Llama shapes."""
    from mergeflow.merging.methods import get_method

    rows: list[Row] = []
    models = (
        (f"gpu-check-{plan.mode}-vit", plan.vit, plan.vit_label, "float32", "structured"),
        (
            f"gpu-check-{plan.mode}-llama-{_layers(plan.llama)}l",
            plan.llama,
            plan.llama_label,
            "bfloat16",
            "dense",
        ),
    )
    for suite, layout, label, dtype, deltas in models:
        cached = (compare.WORK / suite / "spec.json").exists()
        reason = None if cached else clock.why_not(plan.need("build", layout))
        files = None
        if reason:
            rows.append(Row("folds", f"{label}: inputs", note=reason))
        else:
            built, files = inputs_row("folds", suite, layout, label, dtype, deltas)
            rows.append(built)
        for name in ("task_arithmetic", "opcm"):
            row = Row("folds", f"{label}: {name}", note="s per fold: fold 1 / fold 2")
            if name == "opcm":
                row.note += " (projected)"
            rows.append(row)
            reason = clock.why_not(plan.need("fold", layout)) if files else "skipped: no inputs"
            if reason:
                row.note = reason
                continue
            assert files is not None
            with guarded(row):
                r = merge_on(
                    get_method(name), {}, *files, work / "folds", plan.device, export=False
                )
                row.result = " / ".join(f"{s:.2f}" for s in r.folds)
                row.seconds = f"{r.seconds:.2f}"
                row.peak = _mib(r.peak)
            shutil.rmtree(work / "folds", ignore_errors=True)
    return rows


def _layers(layout: Mapping[str, tuple[int, ...]]) -> int:
    return sum(1 for k in layout if k.endswith("input_layernorm.weight"))


def part_latency(plan: Plan, clock: Clock, work: Path) -> list[Row]:
    """The fold and export phases of publish -> registered at ViT-B/32 size (module doc)."""
    from mergeflow.merging.methods import get_method

    row = Row(
        "latency",
        f"{plan.vit_label}: opcm fold of checkpoint 2 + export",
        note=f"publish -> registered's fold and export phases only, on {plan.device}, local "
        "disk: benchmarks/latency.py needs the embedded stack (Prefect, MLflow, SeaweedFS) and "
        "its lineage folds on cpu",
    )
    reason = clock.why_not(plan.need("fold", plan.vit))
    if reason:
        row.note = f"{reason}; {row.note}"
        return [row]
    with guarded(row):
        files = register_suite(f"gpu-check-{plan.mode}-vit", plan.vit, "float32", "structured")
        r = merge_on(get_method("opcm"), {}, *files, work / "latency", plan.device)
        fold, export = r.folds[-1], r.export or 0.0
        row.result = f"{fold + export:.2f} s (fold {fold:.2f} + export {export:.2f})"
        row.seconds = f"{r.seconds:.2f}"
        row.peak = _mib(r.peak)
    shutil.rmtree(work / "latency", ignore_errors=True)
    return [row]


# ------------------------------------------------------------------------------ output


def header(plan: Plan, argv: list[str]) -> list[str]:
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        device = f"cpu only ({platform.processor() or platform.machine()})"
    lines = [
        f"# GPU check ({plan.mode} mode)",
        "",
        f"- device: {device}; {os.cpu_count()} CPU cores",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- agreement: {_label(plan.candidate)} against {_label(plan.reference)}; "
        f"folds and latency on {plan.device}",
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"`benchmarks/gpu_check.py {' '.join(argv)}`".rstrip(),
    ]
    lines += [f"- {n}" for n in plan.notes]
    return lines


def table(rows: list[Row]) -> list[str]:
    out = [
        "| part | case | result | seconds | peak GPU MiB | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r.part, r.case, r.result, r.seconds, r.peak, r.note)
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return out


FOOTER = [
    "",
    "agreement: worst per-tensor ‖θ_candidate − θ_reference‖ / ‖θ_reference − θ₀‖ of the merged "
    "model (float32 outputs), 2 checkpoints; seconds: the merge on each side (folds + export). "
    "folds: 2 checkpoints into a state on local disk, export excluded. Peak GPU memory: "
    "`torch.cuda.max_memory_allocated`, reset per measurement (`-` on a cpu).",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--reduced", action="store_true", help="tiny shapes (the default without CUDA)")
    ap.add_argument("--full", action="store_true", help="full sizes even without CUDA (slow)")
    ap.add_argument("--out", type=Path, help="the markdown file (default: see the module doc)")
    ap.add_argument(
        "--work",
        type=Path,
        default=HERE / "_work" / "gpu_check",
        help="inputs and outputs (default benchmarks/_work/gpu_check)",
    )
    ap.add_argument("--llama-layers", type=int, default=LLAMA_LAYERS, help="full mode (default 4)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    ap.add_argument("--methods", help="agreement: only these methods (comma-separated)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    mode = "full" if args.full or (torch.cuda.is_available() and not args.reduced) else "reduced"
    work = args.work.absolute() / mode
    compare.WORK = work / "inputs"  # where compare.build writes the suites
    plan = make_plan(mode, args.llama_layers, work)
    out = args.out or HERE / "results" / (
        "gpu_check.md" if mode == "full" else "gpu_check_reduced.md"
    )
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    methods = list(METHODS)
    if args.methods:
        wanted = set(args.methods.split(","))
        methods = [m for m in METHODS if m.name in wanted]
        if wanted - {m.name for m in methods}:
            ap.error(f"unknown methods {sorted(wanted - {m.name for m in methods})}")

    clock = Clock(plan.total * args.budget_scale)
    t = time.perf_counter()
    warm_up(plan.device)
    times = [Row("time", "setup (warm-up)", seconds=f"{time.perf_counter() - t:.1f}")]
    rows: list[Row] = []
    for part in PARTS:
        budget = plan.budgets[part] * args.budget_scale
        if part not in parts:
            times.append(Row("time", part, note="not asked for (--parts)"))
            continue
        t = clock.start_part(budget)
        print(f"== {part} (budget {budget:.0f} s)", flush=True)
        if part == "agreement":
            rows += part_agreement(plan, clock, work / "out", methods)
        elif part == "folds":
            rows += part_folds(plan, clock, work / "out")
        else:
            rows += part_latency(plan, clock, work / "out")
        times.append(
            Row(
                "time",
                part,
                seconds=f"{time.perf_counter() - t:.1f}",
                note=f"budget {budget:.0f} s",
            )
        )
    times.append(
        Row(
            "time",
            "total",
            seconds=f"{time.perf_counter() - clock.t0:.1f}",
            note=f"budget {plan.total * args.budget_scale:.0f} s",
        )
    )
    text = "\n".join([*header(plan, argv), "", *table(rows + times), *FOOTER]) + "\n"
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
