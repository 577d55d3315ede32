"""Build the FusionBench DOP agreement fixtures in ``tests/data/fusionbench_dop/``.

Run from the repository root (after ``benchmarks/fusionbench_reference.py`` has written the
base and task files, which are committed)::

    .venv/bin/python benchmarks/fusionbench_dop_reference.py

What it does:

1. Creates (once) the separate virtual environment ``benchmarks/.venv-fusionbench`` with
   fusion-bench (the same venv and pins as ``benchmarks/fusionbench_reference.py``, whose
   ``ensure_venv`` it calls).
2. Inside that venv (``--driver``), runs FusionBench's architecture-agnostic DOP,
   ``fusion_bench.method.dop.dop_general.DOPMerging``, with the defaults of FusionBench's
   ``config/method/dop/dop_general.yaml`` (lr 1e-4, 200 Adam steps, MGDA with EMA, beta 0.999,
   initial alpha 0.8, svd_epsilon 0.99999, projection space ``uv``) but no shuffling, on CPU,
   over the OPCM fixture's ``base`` and ``task_0..task_1`` and ``task_0..task_2`` (read from
   ``tests/data/fusionbench/``: same ``TinyViT``, imported from that script, not copied), on
   freshly loaded models each time.
3. Writes ``expected_step2.safetensors``, ``expected_step3.safetensors`` and ``README.md``
   (versions, parameters, order, command, time, and the SVD ranks DOP kept per layer).

The algorithm is set up the way ``fusionbench_reference.py`` sets up OPCM: constructed with
keyword arguments (no Hydra), handed a ``BaseModelPool`` of ``nn.Module`` instances, and given
a single-device CPU ``lightning.Fabric`` through its ``fabric`` setter (``LightningFabricMixin``
would otherwise build a default ``L.Fabric(devices=1)`` itself); no loggers, no ray actors.

Only torch, safetensors and the OPCM script (torch, safetensors, ``venvs``) are imported at
module level, so the same file runs inside the FusionBench venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import fusionbench_reference as fixture  # TinyViT, the venv and its pins, the input files
import torch
from safetensors.torch import load_file, save_file
from torch import nn

REPO_ROOT = fixture.REPO_ROOT
INPUT_DIR = fixture.DATA_DIR  # tests/data/fusionbench: base.safetensors, task_{i}.safetensors
DATA_DIR = REPO_ROOT / "tests" / "data" / "fusionbench_dop"
SEED = 0
STEPS = (2, 3)
# FusionBench's config/method/dop/dop_general.yaml, except shuffle_order (true there) and
# evaluate_on_every_step (true there; DOPMerging.run never reads it).
DOP_PARAMS: dict[str, object] = {
    "lr": 1e-4,
    "num_steps": 200,
    "mgda": True,
    "ema": True,
    "ema_beta": 0.999,
    "alpha": 0.8,
    "svd_epsilon": 0.99999,
    "svd_proj_space": "uv",
}
RUN_PARAMS: dict[str, object] = {
    "seed": SEED,  # DOPMerging stores it but draws nothing; torch is seeded too
    "shuffle_order": False,
    "save_on_every_step": False,
    "evaluate_on_every_step": False,
    "num_ray_actors": 0,
}


def linear_weights() -> list[str]:
    """State-dict names of the ``nn.Linear`` weights: the tensors DOP optimises."""
    model = fixture.TinyViT()
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def kept_rank(weight: torch.Tensor, base: torch.Tensor, eps: float) -> tuple[int, int, float]:
    """DOP's rank for one task vector, as ``DOPMerging._optimize_weight`` computes it.

    Returns (kept rank, number of singular values, distance of the nearest cumulative ratio
    to eps): ``searchsorted`` picks the first index whose ratio of summed singular values
    reaches eps, and DOP keeps the directions before it.
    """
    s = torch.linalg.svdvals(weight - base)
    ratio = s.cumsum(dim=0) / s.sum()
    rank = int(torch.searchsorted(ratio, eps).item())
    margin = (ratio - eps).abs().min().item()
    return rank, s.numel(), margin


def rank_report(params: dict[str, object]) -> dict[str, dict[str, list[object]]]:
    """Per fold and Linear weight: [rank kept for the merged side, for the new task, number of
    singular values, closest cumulative ratio to eps] (recomputed from the files, float32)."""
    eps = float(params["svd_epsilon"])  # type: ignore[arg-type]
    base = load_file(str(INPUT_DIR / "base.safetensors"))
    merged = load_file(str(INPUT_DIR / "task_0.safetensors"))
    report: dict[str, dict[str, list[object]]] = {}
    for step in range(2, max(STEPS) + 1):
        new = load_file(str(INPUT_DIR / f"task_{step - 1}.safetensors"))
        rows: dict[str, list[object]] = {}
        for key in linear_weights():
            r_old, n, m_old = kept_rank(merged[key], base[key], eps)
            r_new, _, m_new = kept_rank(new[key], base[key], eps)
            rows[key] = [r_old, r_new, n, min(m_old, m_new)]
        report[f"fold to step {step}"] = rows
        merged = load_file(str(DATA_DIR / f"expected_step{step}.safetensors"))
    return report


# --------------------------------------------------------------------------- generation side


def write_readme(meta: dict[str, object], seconds: float) -> None:
    """Write README.md with provenance, the exact settings and the rank table."""
    files = sorted(p.name for p in DATA_DIR.glob("*.safetensors"))
    timings = meta["seconds"]
    assert isinstance(timings, dict)
    params = ", ".join(f"{k}={v!r}" for k, v in {**DOP_PARAMS, **RUN_PARAMS}.items())
    ranks = meta["ranks"]
    assert isinstance(ranks, dict)
    rank_lines = []
    for fold, rows in ranks.items():
        groups: dict[tuple[int, int, int], list[str]] = {}
        for key, (r_old, r_new, n, _) in rows.items():
            groups.setdefault((r_old, r_new, n), []).append(f"`{key}`")
        margin = min(m for *_, m in rows.values())
        kept = "; ".join(
            f"{a} (merged) / {b} (new) of {n}: {', '.join(keys)}"
            for (a, b, n), keys in groups.items()
        )
        rank_lines.append(f"- {fold} (nearest cumulative ratio {margin:.1e} from eps): {kept}")
    rank_text = "\n".join(rank_lines)
    text = f"""# FusionBench DOP agreement fixtures

Generated by `benchmarks/fusionbench_dop_reference.py`; regenerate with (from the repo root)

    .venv/bin/python benchmarks/fusionbench_dop_reference.py

It took {seconds:.0f} s on a 2-core machine (venv reused; the FusionBench runs themselves
{timings["2"]:.0f} s for step 2 and {timings["3"]:.0f} s for step 3, one thread).

- fusion-bench: {meta["fusion_bench"]} (in the separate venv `benchmarks/.venv-fusionbench`)
- torch: {meta["torch"]} (CPU, `torch.set_num_threads(1)`), lightning {meta["lightning"]}
- algorithm: `fusion_bench.method.dop.dop_general.DOPMerging(...)` with

      {params}

  the defaults of FusionBench's `config/method/dop/dop_general.yaml` except `shuffle_order`
  and `evaluate_on_every_step` (true there; `run` never reads the latter), run through
  `fusion_bench.modelpool.BaseModelPool` with a single-device CPU `lightning.Fabric` handed to the algorithm's `fabric` setter (no Hydra config, no loggers).
- inputs: `tests/data/fusionbench/base.safetensors` and `task_0..task_2.safetensors` (the
  OPCM fixture's `TinyViT`, not copied here).
- order: `task_0, task_1` -> `expected_step2.safetensors`;
  `task_0, task_1, task_2` -> `expected_step3.safetensors` (each from a fresh run).
- files: {", ".join(files)} (float32, state_dict names of `TinyViT`).
- checked by `tests/test_fusionbench_agreement.py::test_dop_matches_fusionbench` (mergeflow's
  `dop` with its defaults, which are these values).

What FusionBench's `DOPMerging.run` does with these models:
- the first model (`task_0`) is the merged model as it is; each later one is folded in by
  `_layer_wise_optimize` over the leaf modules of a copy of the base;
- `nn.Linear` weights (`blocks.*.qkv/proj/fc1/fc2.weight`, `head.weight`) are optimised: start
  from the mean of the merged and the new weight, then 200 Adam steps (lr 1e-4) on
  `c_0·L_0 + c_1·L_1`, `L_i = ‖diag(s_i) U_iᵀ Δ_i‖² + ‖Δ_i V_i diag(s_i)‖²`,
  `Δ_i = W - W_i`, where `U_i, s_i, V_i` are the leading singular triplets of `W_i - W_0`
  (i = 0 the merged model, 1 the new task); `c` is an EMA (beta 0.999, start 0.8 / 0.2) of
  the MGDA min-norm weights of the loss-normalised gradients (`MinNormSolver`, 2 tasks: the
  closed form, computed in float32 torch);
- everything else (Linear biases, LayerNorms, the Conv2d patch embedding, the `pos_embed`
  Embedding) is `simple_average` of the merged and the new model: an equal 1/2, 1/2 mean at
  every fold, not a running mean (after 3 tasks: 1/4, 1/4, 1/2).

Ranks DOP keeps (`torch.searchsorted(cumsum(s) / sum(s), svd_epsilon)`: the index of the first
cumulative ratio that reaches eps, so the direction that crosses it is dropped, and with eps =
0.99999 every full-rank task vector here loses its smallest singular direction; recomputed
from these files in float32; a margin far above float32 rounding means the rank cannot flip):
{rank_text}
"""
    (DATA_DIR / "README.md").write_text(text)


def main() -> None:
    """Run FusionBench's DOP in its venv, write README and print a summary."""
    start = time.time()
    fixture.ensure_venv()
    missing = [
        n
        for n in ("base", "task_0", "task_1", "task_2")
        if not (INPUT_DIR / f"{n}.safetensors").exists()
    ]
    if missing:
        sys.exit(f"missing {missing} in {INPUT_DIR}: run benchmarks/fusionbench_reference.py first")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(fixture.venv_python()), str(Path(__file__).resolve()), "--driver"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        sys.exit(f"driver failed ({result.returncode}):\n{result.stderr[-4000:]}")
    meta_line = [ln for ln in result.stdout.splitlines() if ln.startswith("META ")][-1]
    meta = json.loads(meta_line[len("META ") :])
    write_readme(meta, time.time() - start)
    for path in DATA_DIR.iterdir():
        path.chmod(0o644)  # safetensors writes 0600

    base = load_file(str(INPUT_DIR / "base.safetensors"))
    print(f"fusion-bench {meta['fusion_bench']}, torch {meta['torch']}, {DOP_PARAMS}")
    for step in STEPS:
        merged = load_file(str(DATA_DIR / f"expected_step{step}.safetensors"))
        tv = torch.sqrt(sum(((merged[k] - base[k]) ** 2).sum() for k in base)).item()
        print(
            f"expected_step{step}: ||merged - base|| = {tv:.4f}"
            f" (FusionBench run {meta['seconds'][str(step)]:.1f} s)"
        )
    for fold, rows in meta["ranks"].items():
        ranks = ", ".join(
            f"{k.removesuffix('.weight')} {a}/{b}/{n}" for k, (a, b, n, _) in rows.items()
        )
        margin = min(m for *_, m in rows.values())
        print(f"{fold}: kept ranks (merged/new/of) {ranks}; nearest ratio {margin:.1e} from eps")
    total = sum(p.stat().st_size for p in DATA_DIR.iterdir() if p.is_file())
    print(f"wrote {DATA_DIR.relative_to(REPO_ROOT)} ({total / 1024:.0f} KiB in all)")
    print(f"done in {time.time() - start:.0f} s")


# --------------------------------------------------------------------------- FusionBench side


def driver() -> None:
    """Inside the FusionBench venv: run its DOP over the fixtures and save the merges."""
    from importlib.metadata import version

    import lightning as L
    from fusion_bench.method.dop.dop_general import DOPMerging
    from fusion_bench.modelpool import BaseModelPool

    torch.set_num_threads(1)  # keep the float32 SVD and matmul paths fixed across machines
    torch.manual_seed(SEED)

    def load(name: str) -> fixture.TinyViT:
        model = fixture.TinyViT()
        model.load_state_dict(load_file(str(INPUT_DIR / f"{name}.safetensors")), strict=True)
        return model.eval()

    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    seconds: dict[str, float] = {}
    for step in STEPS:
        names = [f"task_{t}" for t in range(step)]
        models: dict[str, nn.Module] = {"_pretrained_": load("base")}
        models.update({n: load(n) for n in names})  # fresh copies for every run
        pool = BaseModelPool(models)
        assert pool.model_names == names, pool.model_names
        algo = DOPMerging(**DOP_PARAMS, **RUN_PARAMS)
        algo.fabric = fabric  # no loggers: log_dir is None
        t0 = time.time()
        merged = algo.run(pool)
        seconds[str(step)] = time.time() - t0
        out = {k: v.detach().to(torch.float32).contiguous() for k, v in merged.state_dict().items()}
        save_file(out, str(DATA_DIR / f"expected_step{step}.safetensors"))
    meta = {
        "fusion_bench": version("fusion-bench"),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "seconds": seconds,
        "ranks": rank_report(DOP_PARAMS),
    }
    print("META " + json.dumps(meta))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--driver", action="store_true", help="internal: run inside the venv")
    if parser.parse_args().driver:
        driver()
    else:
        main()
