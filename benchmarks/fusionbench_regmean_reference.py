"""Build the FusionBench RegMean / Fisher agreement fixtures in ``tests/data/fusionbench_stats/``.

Run from the repository root::

    .venv/bin/python benchmarks/fusionbench_regmean_reference.py

What it does:

1. Creates (once) the separate virtual environment ``benchmarks/.venv-fusionbench`` with
   fusion-bench (the same venv and pins as ``benchmarks/fusionbench_reference.py``).
2. Builds a small seeded model named like a Hugging Face decoder layer (``TinyHF``: LayerNorms,
   ``self_attn.o_proj`` 16->16, ``mlp.up_proj`` 16->24, ``mlp.down_proj`` 24->16, all with bias,
   and a final ``model.norm``), a base and 3 checkpoints (base plus a structured delta of 2-6 %
   of each tensor's norm), and per checkpoint the statistics in mergeflow's format
   (``mergeflow.merging.stats``): the Gram ``mean x xᵀ`` of every Linear's inputs, taken with
   forward hooks on the checkpoint's own model over 128 correlated, task-specific input tokens,
   and a positive log-normal diagonal "Fisher" for every parameter; all float32.
3. Inside the FusionBench venv (``--driver``), runs FusionBench's own merge functions on the
   same weights and statistics, upcast to float64 (exact for float32 inputs):
   ``fusion_bench.method.regmean.regmean.merging_with_regmean_weights`` (ratio 0.9) and
   ``fusion_bench.method.fisher_merging.fisher_merging.merging_with_fisher_weights``
   (coefficients 1/n, ε 1e-6, normalized and not). It also runs them in float32 (FusionBench's
   path for float32 models) and reports how far that lies from its float64 result.
4. Writes ``base.safetensors``, ``ck_{i}/model.safetensors``, ``ck_{i}/mergeflow_stats.safetensors``,
   ``expected_regmean.safetensors``, ``expected_fisher.safetensors``,
   ``expected_fisher_unnormalized.safetensors`` (float64) and ``README.md``.

The same file is the driver that runs inside the FusionBench venv, so the model definition is
shared; only torch and safetensors are imported at module level (plus ``venvs``, which needs
nothing else).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import venvs  # benchmarks/venvs.py (this folder is on sys.path when run as a script)
from safetensors.torch import load_file, save_file
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = REPO_ROOT / "benchmarks" / ".venv-fusionbench"
DATA_DIR = REPO_ROOT / "tests" / "data" / "fusionbench_stats"
FUSION_BENCH_PIN = "fusion-bench==0.2.33"
FUSION_BENCH_DEPS = ["transformers<5", "datasets<4", "huggingface_hub<1"]
SEED = 0
N_CKPTS = 3
DIM, HIDDEN = 16, 24
EXAMPLES, SEQ = 8, 16  # 128 calibration tokens per checkpoint
ALPHA = 0.9  # RegMean's reduce_non_diagonal_ratio (mergeflow's alpha)
MIN_FISHER = 1e-6  # FusionBench's minimal_fisher_weight (mergeflow's min_fisher)
STATS_FORMAT = "mergeflow.stats/1"  # mergeflow.merging.stats.STATS_FORMAT (not imported: no
# mergeflow in the FusionBench venv)
EXPECTED = {
    "regmean": "expected_regmean.safetensors",
    "fisher": "expected_fisher.safetensors",
    "fisher_unnormalized": "expected_fisher_unnormalized.safetensors",
}


class Attention(nn.Module):
    """Stand-in for an attention block: only its output projection (16 -> 16)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.o_proj = nn.Linear(dim, dim)


class MLP(nn.Module):
    """GELU MLP with HF names: ``up_proj`` then ``down_proj``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)


class Layer(nn.Module):
    """Pre-norm residual layer: ``x + o_proj(ln(x))`` then ``h + down(gelu(up(h)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One residual layer."""
        h = x + self.self_attn.o_proj(self.input_layernorm(x))
        return h + self.mlp.down_proj(F.gelu(self.mlp.up_proj(h)))


class Inner(nn.Module):
    """``model.layers.*`` and ``model.norm``, as in an HF causal LM."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(dim, hidden)])
        self.norm = nn.LayerNorm(dim)


class TinyHF(nn.Module):
    """A one-layer decoder-shaped model on float32 token vectors (no embedding, no head)."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.model = Inner(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, dim) -> hidden states (B, T, dim)."""
        for layer in self.model.layers:
            x = layer(x)
        return self.model.norm(x)


def linear_names(model: nn.Module) -> list[str]:
    """Module names of the model's ``nn.Linear`` layers."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- generation side


def venv_python() -> Path:
    """Python of the FusionBench venv."""
    return venvs.python_of(VENV_DIR)


def ensure_venv() -> None:
    """Create the FusionBench venv and install the pins, unless it already works."""
    venvs.ensure_venv(VENV_DIR, "import fusion_bench", [FUSION_BENCH_PIN, *FUSION_BENCH_DEPS])


def _direction(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm random direction: rank-1 (outer product) for matrices, dense otherwise."""
    if len(shape) == 2:
        d = torch.outer(torch.randn(shape[0], generator=gen), torch.randn(shape[1], generator=gen))
    else:
        d = torch.randn(shape, generator=gen)
    return d / d.norm()


def make_deltas(
    base: dict[str, torch.Tensor], gen: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """Per-checkpoint deltas of 2-6 % of each tensor's norm: one shared and two task-specific
    directions plus dense noise (so the task vectors differ and no matrix is rank deficient)."""
    shared = {k: _direction(v.shape, gen) for k, v in base.items()}
    out: list[dict[str, torch.Tensor]] = []
    for _ in range(N_CKPTS):
        rel = 0.02 + 0.04 * torch.rand((), generator=gen).item()
        delta: dict[str, torch.Tensor] = {}
        for k, w in base.items():
            noise = torch.randn(w.shape, generator=gen)
            d = 0.6 * shared[k] + _direction(w.shape, gen) + 0.5 * _direction(w.shape, gen)
            d = d + 0.5 * noise / noise.norm()
            scale = rel * (w.norm().item() + 0.05 * w.numel() ** 0.5)
            delta[k] = (scale * d / d.norm()).to(torch.float32).contiguous()
        out.append(delta)
    return out


def grams_of(model: TinyHF, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mean x xᵀ`` over all tokens of each Linear's input (float64 sums, stored float32)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name in linear_names(model):

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: object, name=name) -> None:
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return {n: (x.T @ x / x.shape[0]).to(torch.float32).contiguous() for n, x in inputs.items()}


def write_inputs() -> None:
    """Write base.safetensors and ck_{i}/{model,mergeflow_stats}.safetensors."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = TinyHF()
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(DATA_DIR / "base.safetensors"))
    gen = torch.Generator().manual_seed(SEED + 1)
    for i, delta in enumerate(make_deltas(base, gen)):
        ck = {k: (base[k] + delta[k]).contiguous() for k in base}
        folder = DATA_DIR / f"ck_{i}"
        folder.mkdir(exist_ok=True)
        save_file(ck, str(folder / "model.safetensors"))
        model.load_state_dict(ck, strict=True)
        # task-specific, correlated inputs: x = mu + z @ L with a random mixing L
        mu = 0.5 * torch.randn(DIM, generator=gen)
        mix = torch.randn(DIM, DIM, generator=gen) / DIM**0.5 + 0.5 * torch.eye(DIM)
        tokens = mu + torch.randn(EXAMPLES, SEQ, DIM, generator=gen) @ mix
        stats = {f"{n}.weight:gram": g for n, g in grams_of(model, tokens).items()}
        for k, w in ck.items():
            fisher = 1e-2 * torch.exp(1.5 * torch.randn(w.shape, generator=gen))
            stats[f"{k}:fisher"] = fisher.to(torch.float32).contiguous()
        meta = {
            "format": STATS_FORMAT,
            "examples": str(EXAMPLES),
            "tokens": str(EXAMPLES * SEQ),
            "data": f"synthetic: seeded correlated Gaussian tokens (ck_{i}), log-normal Fisher",
        }
        save_file(stats, str(folder / "mergeflow_stats.safetensors"), metadata=meta)


def write_readme(meta: dict[str, object]) -> None:
    """Write README.md with provenance and the exact calls."""
    files = sorted(str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*.safetensors"))
    f32 = meta["float32_vs_float64"]
    assert isinstance(f32, dict)
    text = f"""# FusionBench RegMean / Fisher agreement fixtures

Generated by `benchmarks/fusionbench_regmean_reference.py`; regenerate with (from the repo root)

    .venv/bin/python benchmarks/fusionbench_regmean_reference.py

- fusion-bench: {meta["fusion_bench"]} (in the separate venv `benchmarks/.venv-fusionbench`),
  torch {meta["torch"]} (CPU)
- files: {", ".join(files)}
- model (`TinyHF` in the script, seed {SEED}): `model.layers.0.input_layernorm`,
  `model.layers.0.self_attn.o_proj` (Linear 16->16), `model.layers.0.mlp.up_proj` (16->24),
  `model.layers.0.mlp.down_proj` (24->16, after a GELU), all with bias, and `model.norm`
  (LayerNorm 16); float32. `ck_i/model.safetensors` = base + a structured delta of 2-6 % of each
  tensor's norm.
- statistics (`ck_i/mergeflow_stats.safetensors`, format `mergeflow.stats/1`, float32): for
  each Linear, `<module>.weight:gram` = mean over 128 tokens (8 examples x 16) of `x xᵀ` of the
  Linear's input in the checkpoint's own model, on seeded, correlated, task-specific Gaussian
  tokens (full rank; the `o_proj` Grams, of LayerNorm outputs, have condition numbers
  4e7-7e8, but the summed reduced Grams `Σ 0.9·G + 0.1·diag(G)` only 21-71); for every
  parameter, `<param>:fisher` = `1e-2·exp(1.5·N(0,1))` (positive, spanning about 4 orders
  of magnitude).

FusionBench calls (inside the venv, on the checkpoints' full parameters and the same statistics,
all upcast to float64, which is exact for float32 inputs; the expected files are float64):

- `expected_regmean.safetensors`: `fusion_bench.method.regmean.regmean.merging_with_regmean_weights(
  models_to_merge_param_dict, models_to_merge_regmean_weights_list,
  reduce_non_diagonal_ratio={ALPHA}, weight_transpose=True)` with the Grams keyed by module name
  (`model.layers.0.mlp.up_proj`, ...). It merges the 3 Linear weights by RegMean and averages
  every other parameter (biases, LayerNorms).
- `expected_fisher.safetensors`: `fusion_bench.method.fisher_merging.fisher_merging.merging_with_fisher_weights(
  models_to_merge_param_dict, models_to_merge_fisher_weights_list,
  fisher_scaling_coefficients=torch.ones(3) / 3, normalize_fisher_weight=True,
  minimal_fisher_weight={MIN_FISHER})`.
- `expected_fisher_unnormalized.safetensors`: the same with `normalize_fisher_weight=False`.

FusionBench's own float32 path (float32 models) lies this far from its float64 results (max over
tensors of ||f32 - f64|| / ||f64 - base||): regmean {f32["regmean"]:.2e}, fisher
{f32["fisher"]:.2e}, fisher unnormalized {f32["fisher_unnormalized"]:.2e}.

Note: `reduce_non_diagonal_elements` builds its factors as float32 tensors whatever the Gram's
dtype (`torch.ones(n) - ratio`, `fill_(ratio)`), so even in float64 the off-diagonal Gram entries
are scaled by float32(0.9) = 0.8999999761581421 (the diagonal factor is exactly 1). mergeflow's
`alpha=0.9` scales them by 0.9; `tests/test_fusionbench_agreement.py` measures both.
"""
    (DATA_DIR / "README.md").write_text(text)


def _tv_norm(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(
        sum(((merged[k].double() - base[k].double()) ** 2).sum() for k in base)
    ).item()


def main() -> None:
    """Generate inputs, run FusionBench in its venv, write README and print a summary."""
    start = time.time()
    ensure_venv()
    write_inputs()
    result = subprocess.run(
        [str(venv_python()), str(Path(__file__).resolve()), "--driver"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    meta_line = [ln for ln in result.stdout.splitlines() if ln.startswith("META ")][-1]
    meta = json.loads(meta_line[len("META ") :])
    write_readme(meta)
    for path in [DATA_DIR, *DATA_DIR.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes 0600

    base = load_file(str(DATA_DIR / "base.safetensors"))
    print(f"fusion-bench {meta['fusion_bench']}, torch {meta['torch']}")
    print(f"model: {len(base)} tensors, {sum(v.numel() for v in base.values())} parameters")
    for i in range(N_CKPTS):
        ck = load_file(str(DATA_DIR / f"ck_{i}" / "model.safetensors"))
        print(f"ck_{i}: ||tau|| = {_tv_norm(ck, base):.4f}")
    for file in EXPECTED.values():
        merged = load_file(str(DATA_DIR / file))
        print(f"{file}: ||merged - base|| = {_tv_norm(merged, base):.4f}")
    print("FusionBench float32 vs float64:", meta["float32_vs_float64"])
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    print(f"wrote {DATA_DIR.relative_to(REPO_ROOT)} ({total / 1024:.0f} KiB in all)")
    print(f"done in {time.time() - start:.0f} s")


# --------------------------------------------------------------------------- FusionBench side


def _fusionbench_merges(dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """FusionBench's RegMean and Fisher merges of the fixtures, computed in ``dtype``."""
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    names = [n for n, _ in TinyHF().named_parameters()]
    linears = set(linear_names(TinyHF()))
    params: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    grams: list[dict[str, torch.Tensor]] = []
    fishers: list[dict[str, torch.Tensor]] = []
    for i in range(N_CKPTS):
        ck = load_file(str(DATA_DIR / f"ck_{i}" / "model.safetensors"))
        stats = load_file(str(DATA_DIR / f"ck_{i}" / "mergeflow_stats.safetensors"))
        for n in names:
            params[n].append(ck[n].to(dtype))
        g = {
            k.removesuffix(".weight:gram"): v.to(dtype)
            for k, v in stats.items()
            if k.endswith(":gram")
        }
        assert set(g) == linears, sorted(
            g
        )  # FusionBench would silently average a Linear without one
        grams.append(g)
        fishers.append(
            {
                k.removesuffix(":fisher"): v.to(dtype)
                for k, v in stats.items()
                if k.endswith(":fisher")
            }
        )
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        out["regmean"] = merging_with_regmean_weights(
            models_to_merge_param_dict=params,
            models_to_merge_regmean_weights_list=grams,
            reduce_non_diagonal_ratio=ALPHA,
            weight_transpose=True,
        )
        for key, normalize in (("fisher", True), ("fisher_unnormalized", False)):
            out[key] = merging_with_fisher_weights(
                models_to_merge_param_dict=params,
                models_to_merge_fisher_weights_list=fishers,
                fisher_scaling_coefficients=torch.ones(N_CKPTS) / N_CKPTS,
                normalize_fisher_weight=normalize,
                minimal_fisher_weight=MIN_FISHER,
            )
    for merged in out.values():
        assert set(merged) == set(names), sorted(set(merged) ^ set(names))
        for k, v in merged.items():
            assert v.dtype == dtype, (k, v.dtype)  # no silent downcast inside FusionBench
    return out


def driver() -> None:
    """Inside the FusionBench venv: merge with its RegMean and Fisher and save the results."""
    from importlib.metadata import version

    torch.set_num_threads(1)
    base = load_file(str(DATA_DIR / "base.safetensors"))
    ref = _fusionbench_merges(torch.float64)
    f32 = _fusionbench_merges(torch.float32)
    gap: dict[str, float] = {}
    for key, merged in ref.items():
        save_file({k: v.contiguous() for k, v in merged.items()}, str(DATA_DIR / EXPECTED[key]))
        gap[key] = max(
            (f32[key][k].double() - v).norm().item() / (v - base[k].double()).norm().item()
            for k, v in merged.items()
        )
    meta = {
        "fusion_bench": version("fusion-bench"),
        "torch": torch.__version__,
        "float32_vs_float64": gap,
    }
    print("META " + json.dumps(meta))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--driver", action="store_true", help="internal: run inside the venv")
    if parser.parse_args().driver:
        driver()
    else:
        main()
