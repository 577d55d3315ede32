"""mergeflow beside mergekit: agreement, peak RSS and wall time on one Llama-shaped model.

Run from the repository root (5-8 minutes on 2 cores, the first time a minute more for the
mergekit venv)::

    .venv/bin/python benchmarks/mergekit_compare.py

What it does:

1. Creates (once) a separate venv ``benchmarks/.venv-mergekit`` and installs ``torch==2.13.0``
   first (CPU wheel from local disk), then ``mergekit==0.1.5`` with its own dependencies. The
   venv is reused when it already imports ``mergekit``.
2. Builds under ``benchmarks/_work/mergekit/`` a randomly initialised, seeded
   ``LlamaForCausalLM`` (float32, hidden 1024, intermediate 2816, 7 layers, 16 heads with 4
   key/value heads, vocab 8000, untied lm_head: 95 M parameters, 364 MiB) written with
   ``save_pretrained`` (safetensors), and 3 "fine-tuned" checkpoints: base plus seeded Gaussian
   deltas (std 0.002 everywhere, about 10 % of an init-std weight), saved the same way.
3. Runs each merge as its own process under ``/usr/bin/time -v`` (peak RSS, wall), sampling
   the process's ``RssAnon`` every 20 ms as well (peak RSS also counts the pages of the
   memory-mapped inputs that mergekit touches; RssAnon does not):
   mergekit ``task_arithmetic`` (weight 0.3 each, ``normalize: false``) and ``ties`` (density
   0.2, weight 1.0, ``normalize: true``) through ``mergekit-yaml --lazy-unpickle --device cpu
   --no-copy-tokenizer --out-shard-size 100M`` (``--lazy-unpickle`` only affects pickled
   weights: mergekit always reads safetensors one tensor at a time through ``safe_open``; it
   keeps a whole output shard in memory, so small shards are its low-memory setting; task
   arithmetic also runs once with the default 5B shard); and ``python -m mergeflow merge``
   with ``batch_task_arithmetic``, ``task_arithmetic`` (continual, same formula),
   ``batch_ties`` (density 0.2, scaling 1.0, merge_func mean) and ``opcm`` (no mergekit
   counterpart; for memory only).
4. Checks the agreement of the merged weights: worst per-tensor ``‖A − B‖ / ‖B − θ₀‖``
   (relative to the merged task vector) between the tools, each task arithmetic output against
   the exact float64 result beside the float32 rounding floor, and for TIES recomputes
   mergeflow's formula with both trim counts to account for every differing entry.
5. Prints a table of peak RSS / RssAnon / wall time with mergekit/mergeflow ratios.
   ``--check-only`` repeats step 4 on the outputs of an earlier run.

TIES semantics: mergekit's ``ties`` with every ``weight: 1.0`` and ``normalize: true`` is
mergeflow's ``batch_ties`` with ``merge_func=mean`` (mergekit divides by the summed weights of
the agreeing entries, which is their count when every weight is 1). Known differences, all at
single entries: mergekit keeps ``max(1, floor(density·n))`` entries per tensor and breaks
magnitude ties by sort order, mergeflow keeps ``ceil(density·n)`` and every entry tied at the
threshold; where the trimmed sum is exactly 0 mergekit elects ``+``, mergeflow elects no sign.
With weights other than 1, mergekit elects the sign on weighted deltas and takes a weighted
mean; mergeflow's ``batch_ties`` has no per-checkpoint weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import venvs  # benchmarks/venvs.py (this folder is on sys.path when run as a script)
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "mergekit"
VENV_DIR = HERE / ".venv-mergekit"
MERGEKIT_PIN = "mergekit==0.1.5"
N_CKPTS = 3
SEED = 0
DELTA_STD = 0.002
TA_WEIGHT = 0.3
TIES_DENSITY = 0.2
MK_SHARD = "100M"  # mergekit keeps a whole output shard in memory (default 5B)
MK_REF = {
    "task_arithmetic": f"mergekit task_arithmetic ({MK_SHARD} shards)",
    "ties": f"mergekit ties ({MK_SHARD} shards)",
}
LLAMA = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=7,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=8000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
MF_IMPORTS = (
    "import mergeflow.cli, mergeflow.merging.engine, mergeflow.merging.methods, "
    "mergeflow.storage.checkpoints, mergeflow.storage.states, "
    "mergeflow.storage.safetensors_file, mergeflow.storage.shard_writer, mergeflow.storage.objects"
)
ENV = os.environ | {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def venv_python() -> Path:
    """Python of the mergekit venv."""
    return venvs.python_of(VENV_DIR)


def ensure_venv() -> None:
    """Create the mergekit venv and install the pins, unless it already works."""
    venvs.ensure_venv(VENV_DIR, "import mergekit.merge", [MERGEKIT_PIN])


def build() -> tuple[Path, list[Path]]:
    """Write base/ and ft_{i}/ with save_pretrained (reused when the recorded spec matches)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = WORK / "base"
    cks = [WORK / f"ft_{i}" for i in range(N_CKPTS)]
    spec = json.dumps({"llama": LLAMA, "seed": SEED, "delta_std": DELTA_STD, "n": N_CKPTS})
    marker = WORK / "spec.json"
    if marker.exists() and marker.read_text() == spec:
        return base_dir, cks
    WORK.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    config = LlamaConfig(**LLAMA, dtype="float32")
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(base_dir)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, ck in enumerate(cks):
        g = torch.Generator().manual_seed(SEED + 100 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + DELTA_STD * torch.randn(p.shape, generator=g))
        model.save_pretrained(ck)
    marker.write_text(spec)
    return base_dir, cks


def _rss_anon_kb(pid: int) -> int:
    """RssAnon of pid and its descendants (anonymous memory: heap, tensors; not file pages)."""
    total = 0
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"RssAnon:\s+(\d+)", status).group(1))
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, AttributeError):
        return total
    return total + sum(_rss_anon_kb(int(c)) for c in children)


def timed(name: str, cmd: list[str]) -> tuple[float, float, float]:
    """Run under /usr/bin/time -v; return (peak RSS MiB, sampled peak RssAnon MiB, wall s).

    Peak RSS counts the pages of memory-mapped input files the process touched (mergekit reads
    safetensors through mmap); RssAnon, sampled every 20 ms, counts only anonymous memory.
    """
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(
        ["/usr/bin/time", "-v", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    peak_anon = 0
    while p.poll() is None:
        peak_anon = max(peak_anon, _rss_anon_kb(p.pid))
        time.sleep(0.02)
    stderr = p.stderr.read() if p.stderr else ""
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{name} failed ({p.returncode}): {' '.join(cmd)}\n{stderr[-4000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    print(
        f"  {name}: peak RSS {kb / 1024:.0f} MiB, peak RssAnon {peak_anon / 1024:.0f} MiB, "
        f"{wall:.1f} s (load average {load:.1f} at start)"
    )
    return kb / 1024, peak_anon / 1024, wall


def mergekit_yaml(method: str, base: Path, cks: list[Path]) -> str:
    """mergekit config for task_arithmetic or ties over base + cks, float32."""
    if method == "task_arithmetic":
        params, norm = f"weight: {TA_WEIGHT}", "false"
    else:
        params, norm = f"weight: 1.0\n      density: {TIES_DENSITY}", "true"
    models = "".join(f"  - model: {c}\n    parameters:\n      {params}\n" for c in cks)
    return (
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
        f"parameters:\n  normalize: {norm}\ndtype: float32\n"
    )


class Weights:
    """The tensors of a model folder (every *.safetensors in it), read one at a time."""

    def __init__(self, path: Path) -> None:
        self.files = {}
        for f in sorted(path.glob("*.safetensors")):
            st = safe_open(str(f), framework="pt")
            self.files |= {k: st for k in st.keys()}
        if not self.files:
            sys.exit(f"no safetensors in {path}")

    def keys(self) -> list[str]:
        """Tensor names."""
        return list(self.files)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.files[key].get_tensor(key)


def max_entry_err(a: torch.Tensor, b: torch.Tensor, t0: torch.Tensor) -> float:
    """max |a − b| / max |b − θ₀|: the worst single entry against the largest task-vector entry."""
    a, b, t0 = a.double(), b.double(), t0.double()
    return float((a - b).abs().max() / (b - t0).abs().max().clamp(min=1e-30))


def rel_err(a: torch.Tensor, b: torch.Tensor, t0: torch.Tensor) -> float:
    """‖a − b‖ / ‖b − t0‖ in float64 (the error relative to the merged task vector)."""
    a, b, t0 = a.double(), b.double(), t0.double()
    return float((a - b).norm() / (b - t0).norm().clamp(min=1e-30))


def compare(name_a: str, a: Weights, name_b: str, b: Weights, base: Weights) -> None:
    """Print worst per-tensor ‖A − B‖/‖B − θ₀‖, bitwise-differing entries, worst single entry."""
    if set(a.keys()) != set(base.keys()) or set(b.keys()) != set(base.keys()):
        sys.exit(f"tensor names differ between {name_a}, {name_b} and the base")
    worst, where, n_diff, entry = 0.0, "-", 0, 0.0
    for k in base.keys():
        ak, bk, t0 = a[k], b[k], base[k]
        err = rel_err(ak, bk, t0)
        if err > worst:
            worst, where = err, k
        n_diff += int((ak != bk).sum())
        entry = max(entry, max_entry_err(ak, bk, t0))
    print(
        f"  {name_a} vs {name_b}: worst {worst:.2e} ({where}); "
        f"{n_diff} entries differ bitwise; worst max|A - B| / max|B - θ₀| {entry:.2e}"
    )


def check_task_arithmetic(base: Weights, cks: list[Weights], outs: dict[str, Weights]) -> None:
    """Each output against the exact (float64) θ₀ + 0.3·Σ τ_i, beside the float32 rounding floor."""
    worst = dict.fromkeys(outs, 0.0)
    worst_2d = dict.fromkeys(outs, 0.0)
    floor, floor_2d = 0.0, 0.0
    for k in base.keys():
        t0 = base[k].double()
        exact = t0 + TA_WEIGHT * sum(c[k].double() - t0 for c in cks)
        f = rel_err(exact.float(), exact, t0)
        floor = max(floor, f)
        if t0.dim() == 2:
            floor_2d = max(floor_2d, f)
        for name, w in outs.items():
            e = rel_err(w[k], exact, t0)
            worst[name] = max(worst[name], e)
            if t0.dim() == 2:
                worst_2d[name] = max(worst_2d[name], e)
    print(
        "  vs exact float64 θ₀ + 0.3·Σ τ_i, worst per-tensor ‖out − exact‖/‖exact − θ₀‖ "
        "(all tensors / 2-D only):"
    )
    print(f"    float32 rounding of the exact result (floor): {floor:.2e} / {floor_2d:.2e}")
    for name in outs:
        print(f"    {name}: {worst[name]:.2e} / {worst_2d[name]:.2e}")


def explain_ties(base: Weights, cks: list[Weights], mk: Weights, mf: Weights) -> None:
    """Recompute mergeflow's TIES with its own k = ceil(d·n) and with mergekit's floor(d·n).

    Prints how many entries each rule leaves different from each tool's output, and sorts the
    entries where the floor rule still differs from mergekit into magnitude ties at the trim
    threshold (mergeflow keeps every tied entry, mergekit exactly k by sort order) and
    elections on an exactly zero sum (mergekit elects +, mergeflow no sign).
    """
    from mergeflow.merging.methods.ties import disjoint_merge
    from mergeflow.merging.sparsify import trim

    ceil_vs_mf = floor_vs_mk = ceil_vs_mk = at_threshold = zero_sum = other = 0
    for k in base.keys():
        t0 = base[k]
        taus = [c[k] - t0 for c in cks]
        n = t0.numel()
        outs = {}
        thresholds = {}
        for rule, kk in (
            ("ceil", math.ceil(TIES_DENSITY * n)),
            ("floor", max(1, int(TIES_DENSITY * n))),
        ):
            thr = [float(torch.kthvalue(t.abs().reshape(-1), n - kk + 1).values) for t in taus]
            trimmed = [trim(t, th) for t, th in zip(taus, thr, strict=True)]
            outs[rule] = t0 + disjoint_merge(trimmed, "mean")
            thresholds[rule] = (thr, torch.stack(trimmed))
        mk_k, mf_k = mk[k], mf[k]
        ceil_vs_mf += int((outs["ceil"] != mf_k).sum())
        ceil_vs_mk += int((outs["ceil"] != mk_k).sum())
        diff = outs["floor"] != mk_k
        floor_vs_mk += int(diff.sum())
        thr, stacked = thresholds["floor"]
        tied = torch.zeros_like(diff)
        for t, th in zip(taus, thr, strict=True):
            tied |= t.abs() == th
        zero = (stacked.sum(0) == 0) & (stacked != 0).any(0)
        at_threshold += int((diff & tied).sum())
        zero_sum += int((diff & ~tied & zero).sum())
        other += int((diff & ~tied & ~zero).sum())
    print(
        f"  mergeflow's formula, k = ceil(d·n): {ceil_vs_mf} entries differ from mergeflow's output,"
        f" {ceil_vs_mk} from mergekit's"
    )
    print(
        f"  same with mergekit's k = max(1, floor(d·n)): {floor_vs_mk} entries differ from "
        f"mergekit's: {at_threshold} with a |τ| tied at the trim threshold, {zero_sum} with a "
        f"trimmed sum of exactly 0, {other} unexplained"
    )


def main() -> None:
    """Build, run every merge, check agreement, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-opcm", action="store_true", help="leave out mergeflow's opcm run")
    parser.add_argument(
        "--check-only", action="store_true", help="only the agreement checks, on existing outputs"
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    start = time.time()
    ensure_venv()
    base_dir, cks = build()
    base = Weights(base_dir)
    shapes = [base[k] for k in base.keys()]
    n_params = sum(v.numel() for v in shapes)
    size = sum(v.numel() * v.element_size() for v in shapes) / 2**20
    print(f"model: Llama, {len(shapes)} tensors, {n_params / 1e6:.1f} M parameters, {size:.0f} MiB")
    del shapes
    mk_version = subprocess.run(
        [str(venv_python()), "-c", "from importlib.metadata import version as v;"
         "print(v('mergekit'), v('torch'), v('transformers'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    print(f"mergekit {mk_version[0]} (torch {mk_version[1]}, transformers {mk_version[2]})")

    out = WORK / "out"
    out.mkdir(exist_ok=True)
    for name in ("ta.yml", "ties.yml"):
        method = "task_arithmetic" if name == "ta.yml" else "ties"
        (WORK / name).write_text(mergekit_yaml(method, base_dir, cks))
    mk = [
        str(VENV_DIR / "bin" / "mergekit-yaml"),
        "--lazy-unpickle",
        "--device", "cpu",
        "--no-copy-tokenizer",
        "--quiet",
    ]  # fmt: skip
    small = ["--out-shard-size", MK_SHARD]
    mf = [
        str(REPO / ".venv" / "bin" / "python"),
        "-m",
        "mergeflow",
        "merge",
        "--base",
        str(base_dir),
        "--device",
        "cpu",
        "--no-progress",
        "--overwrite",
        "--max-task-vector-ratio",
        "none",
    ]  # fmt: skip  (no other-base screen: mergekit has none)
    cks_s = [str(c) for c in cks]
    ta = f"scale={TA_WEIGHT}"
    ties = ["--param", f"density={TIES_DENSITY}", "--param", "scale=1.0",
            "--param", "merge_func=mean"]  # fmt: skip
    runs: list[tuple[str, str, list[str]]] = [
        ("floor", "python + torch import (project venv)",
         [str(REPO / ".venv" / "bin" / "python"), "-c", "import torch"]),
        ("floor", "python + mergeflow merge's imports (project venv)",
         [str(REPO / ".venv" / "bin" / "python"), "-c", MF_IMPORTS]),
        ("floor", "python + mergekit import (mergekit venv)",
         [str(venv_python()), "-c", "import mergekit.merge"]),
        ("task_arithmetic", "mergekit task_arithmetic (default 5B shard)",
         [*mk, str(WORK / "ta.yml"), str(out / "mk_ta_default")]),
        ("task_arithmetic", MK_REF["task_arithmetic"],
         [*mk, *small, str(WORK / "ta.yml"), str(out / "mk_ta")]),
        ("task_arithmetic", "mergeflow batch_task_arithmetic",
         [*mf, "--method", "batch_task_arithmetic", "--param", ta, "--out", str(out / "mf_bta"),
          *cks_s]),
        ("task_arithmetic", "mergeflow task_arithmetic (continual)",
         [*mf, "--method", "task_arithmetic", "--param", ta, "--out", str(out / "mf_ta"), *cks_s]),
        ("ties", MK_REF["ties"],
         [*mk, *small, str(WORK / "ties.yml"), str(out / "mk_ties")]),
        ("ties", "mergeflow batch_ties",
         [*mf, "--method", "batch_ties", *ties, "--out", str(out / "mf_bties"), *cks_s]),
    ]  # fmt: skip
    if not args.skip_opcm:
        runs.append(("opcm", "mergeflow opcm (no mergekit counterpart)",
                     [*mf, "--method", "opcm", "--out", str(out / "mf_opcm"), *cks_s]))  # fmt: skip
    results: dict[str, tuple[str, float, float, float]] = {}
    if not args.check_only:
        print(f"running {len(runs)} processes one after the other ({os.cpu_count()} cores)")
        for method, name, cmd in runs:
            if name.startswith("mergekit "):
                shutil.rmtree(cmd[-1], ignore_errors=True)  # mergekit has no --overwrite
            results[name] = (method, *timed(name, cmd))

    w = {
        d: Weights(out / d)
        for d in ("mk_ta_default", "mk_ta", "mf_bta", "mf_ta", "mk_ties", "mf_bties")
    }
    ck_w = [Weights(c) for c in cks]
    print("\nagreement: worst per-tensor ||A - B|| / ||B - base||, entries differing bitwise")
    print("task arithmetic:")
    compare("mergeflow batch_task_arithmetic", w["mf_bta"], "mergekit", w["mk_ta"], base)
    compare("mergeflow task_arithmetic", w["mf_ta"], "mergekit", w["mk_ta"], base)
    compare("mergeflow task_arithmetic", w["mf_ta"], "batch_task_arithmetic", w["mf_bta"], base)
    compare("mergekit (5B shard)", w["mk_ta_default"], f"mergekit ({MK_SHARD})", w["mk_ta"], base)
    check_task_arithmetic(
        base,
        ck_w,
        {
            "mergekit": w["mk_ta"],
            "mergeflow batch_task_arithmetic": w["mf_bta"],
            "mergeflow task_arithmetic": w["mf_ta"],
        },
    )
    print("ties (mergekit normalize: true, weight 1.0 = mergeflow batch_ties merge_func=mean):")
    compare("mergeflow batch_ties", w["mf_bties"], "mergekit ties", w["mk_ties"], base)
    explain_ties(base, ck_w, w["mk_ties"], w["mf_bties"])

    if results:
        print(
            "\n| method | tool | peak RSS (MiB) | peak RssAnon (MiB) | wall (s) "
            "| mergekit/mergeflow: RSS | RssAnon | wall |"
        )
        print("|---|---|---|---|---|---|---|---|")
    for name, (method, rss, anon, wall) in results.items():
        ref = MK_REF.get(method)
        if name.startswith("mergeflow") and ref in results:
            _, m_rss, m_anon, m_wall = results[ref]
            ratio = f"{m_rss / rss:.2f}x | {m_anon / anon:.2f}x | {m_wall / wall:.2f}x"
        else:
            ratio = "- | - | -"
        print(f"| {method} | {name} | {rss:.0f} | {anon:.0f} | {wall:.1f} | {ratio} |")
    print(f"\ndone in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
