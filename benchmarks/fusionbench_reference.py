"""Build the FusionBench OPCM agreement fixtures in ``tests/data/fusionbench/``.

Run from the repository root::

    .venv/bin/python benchmarks/fusionbench_reference.py

What it does:

1. Creates (once) a separate virtual environment ``benchmarks/.venv-fusionbench`` and installs
   ``torch==2.13.0`` first (CPU wheel from local disk), then ``fusion-bench`` with
   ``transformers<5``, ``datasets<4`` and ``huggingface_hub<1``, which fusion-bench needs and
   the project venv does not have. The venv is reused when it already imports ``fusion_bench``.
2. Builds a small ViT-shaped model (seeded), trains it briefly on sklearn's digits to get a
   realistic base, and makes 6 task checkpoints: base plus a structured per-tensor delta
   (a few shared and task-specific rank-1 directions with decaying strengths, plus dense noise;
   1-5 % of each tensor's norm). The dense part keeps every projected matrix full rank with
   well-separated singular values, so OPCM's diagonal zeroing is well conditioned.
3. Runs FusionBench's own ``fusion_bench.method.opcm.opcm_general.OPCM`` (alpha 0.5, no
   shuffling) inside the separate venv, on CPU, over task_0..task_1 and over task_0..task_5,
   on freshly loaded models (OPCM mutates the models it is handed).
4. Writes ``base.safetensors``, ``task_{0..5}.safetensors``, ``expected_step2.safetensors``,
   ``expected_step6.safetensors`` and ``README.md`` (versions, alpha, order, command).

The same file is the driver that runs inside the FusionBench venv (``--driver``), so the model
definition is shared; only torch and safetensors are imported at module level.
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
DATA_DIR = REPO_ROOT / "tests" / "data" / "fusionbench"
FUSION_BENCH_PIN = "fusion-bench==0.2.33"
FUSION_BENCH_DEPS = ["transformers<5", "datasets<4", "huggingface_hub<1"]
SEED = 0
ALPHA = 0.5
N_TASKS = 6
STEPS = (2, 6)


class Block(nn.Module):
    """Pre-norm transformer block; every parameter lives in a leaf module (no buffers)."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention then MLP, both residual."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """ViT-shaped classifier for 8x8 single-channel images (sklearn digits).

    No cls token and no bare ``nn.Parameter``: FusionBench's OPCM only merges parameters of
    leaf modules, so the position table is an ``nn.Embedding`` and pooling is a mean.
    """

    def __init__(
        self, dim: int = 32, hidden: int = 64, depth: int = 2, heads: int = 4, classes: int = 10
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.pos_embed = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList([Block(dim, hidden, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 8, 8) -> logits (B, classes)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.weight.unsqueeze(0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


# --------------------------------------------------------------------------- generation side


def venv_python() -> Path:
    """Python of the FusionBench venv."""
    return venvs.python_of(VENV_DIR)


def ensure_venv() -> None:
    """Create the FusionBench venv and install the pins, unless it already works."""
    venvs.ensure_venv(VENV_DIR, "import fusion_bench", [FUSION_BENCH_PIN, *FUSION_BENCH_DEPS])


def train_base() -> TinyViT:
    """Seeded TinyViT trained briefly on sklearn digits, so the base is a real model."""
    from sklearn.datasets import load_digits

    torch.manual_seed(SEED)
    model = TinyViT()
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"base: train accuracy on digits {acc:.3f}, final batch loss {loss.item():.3f}")
    return model


def _direction(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm random direction: rank-1 (outer product) for matrices, dense otherwise."""
    if len(shape) == 2:
        d = torch.outer(torch.randn(shape[0], generator=gen), torch.randn(shape[1], generator=gen))
    else:
        d = torch.randn(shape, generator=gen)
    return d / d.norm()


def make_deltas(base: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-task, per-tensor structured deltas of 1-5 % of each tensor's norm.

    Each delta mixes 2 directions shared by all tasks, 4 task-specific ones with geometrically
    decaying strengths, and dense Gaussian noise (so no matrix is rank deficient).
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    shared = {k: [_direction(v.shape, gen) for _ in range(2)] for k, v in base.items()}
    tasks: list[dict[str, torch.Tensor]] = []
    for _ in range(N_TASKS):
        rel = 0.01 + 0.04 * torch.rand((), generator=gen).item()
        delta: dict[str, torch.Tensor] = {}
        for k, w in base.items():
            parts = [0.8 * shared[k][0], 0.5 * shared[k][1]]
            parts += [(0.7**j) * _direction(w.shape, gen) for j in range(4)]
            noise = torch.randn(w.shape, generator=gen)
            d = sum(parts) + 0.6 * noise / noise.norm()
            scale = rel * (w.norm().item() + 0.05 * w.numel() ** 0.5)
            delta[k] = (scale * d / d.norm()).to(torch.float32).contiguous()
        tasks.append(delta)
    return tasks


def write_inputs() -> None:
    """Write base.safetensors and task_{i}.safetensors."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    model = train_base()
    assert not list(model.buffers()), "buffers would enter FusionBench's task-vector norm"
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(DATA_DIR / "base.safetensors"))
    for t, delta in enumerate(make_deltas(base)):
        task = {k: (base[k] + delta[k]).contiguous() for k in base}
        save_file(task, str(DATA_DIR / f"task_{t}.safetensors"))


def write_readme(meta: dict[str, object]) -> None:
    """Write README.md with provenance and the exact settings."""
    files = sorted(p.name for p in DATA_DIR.glob("*.safetensors"))
    text = f"""# FusionBench OPCM agreement fixtures

Generated by `benchmarks/fusionbench_reference.py`; regenerate with (from the repo root)

    .venv/bin/python benchmarks/fusionbench_reference.py

- fusion-bench: {meta["fusion_bench"]} (in the separate venv `benchmarks/.venv-fusionbench`)
- torch: {meta["torch"]} (CPU), transformers {meta["transformers"]}, lightning {meta["lightning"]}
- algorithm: `fusion_bench.method.opcm.opcm_general.OPCM(alpha={ALPHA}, shuffle_order=False,
  save_on_every_step=False, evaluate_on_every_step=False)`, run on CPU through
  `fusion_bench.modelpool.BaseModelPool` with a single-device CPU `lightning.Fabric`.
- order: `task_0, task_1` -> `expected_step2.safetensors`;
  `task_0, ..., task_5` -> `expected_step6.safetensors`.
- files: {", ".join(files)} (float32, state_dict names of `TinyViT`).

The model (`TinyViT` in the script, seed {SEED}) is a plain float32 `nn.Module`: a Conv2d patch
embedding with bias, an `nn.Embedding` position table `pos_embed`, 2 pre-norm blocks (LayerNorms,
`qkv` 32->96, `proj` 32->32, `fc1` 32->64, `fc2` 64->32, all with bias), a final LayerNorm and a
`head` Linear 32->10. The base is trained for 300 Adam steps on sklearn digits; each task adds a
structured delta (shared + task-specific rank-1 directions plus dense noise, 1-5 % of each
tensor's norm), so the projected matrices are full rank with well-separated singular values.

FusionBench behaviours the model deliberately avoids, so that its output is the OPCM of
docs/design.md section 3:
- parameters owned by non-leaf modules (a bare `nn.Parameter` cls token or position table):
  FusionBench's `_layer_wise_merge` only visits leaf modules and would leave them at task_0;
- buffers: FusionBench's task-vector norm runs over `state_dict()`, ours over float parameters;
- a zero task vector in any Linear weight (FusionBench takes the SVD of M = 0 and divides 0/0).

FusionBench projects exactly the `nn.Linear` weights (`blocks.*.qkv/proj/fc1/fc2.weight`,
`head.weight`); the Conv2d kernel (4-D), `pos_embed.weight` (Embedding), LayerNorms and all
biases are merged without projection. mergeflow's name rules (2-D, not an embedding) pick the
same set for these files.
"""
    (DATA_DIR / "README.md").write_text(text)


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
    for path in DATA_DIR.iterdir():
        path.chmod(0o644)  # safetensors writes 0600

    base = load_file(str(DATA_DIR / "base.safetensors"))
    print(f"fusion-bench {meta['fusion_bench']}, torch {meta['torch']}, alpha {ALPHA}")
    n_params = sum(v.numel() for v in base.values())
    print(f"model: {len(base)} tensors, {n_params} parameters")
    for t in range(N_TASKS):
        task = load_file(str(DATA_DIR / f"task_{t}.safetensors"))
        tv = torch.sqrt(sum(((task[k] - base[k]) ** 2).sum() for k in base)).item()
        print(f"task_{t}: ||tau|| = {tv:.4f}")
    for step in STEPS:
        merged = load_file(str(DATA_DIR / f"expected_step{step}.safetensors"))
        tv = torch.sqrt(sum(((merged[k] - base[k]) ** 2).sum() for k in base)).item()
        print(f"expected_step{step}: ||merged - base|| = {tv:.4f}")
    total = sum(p.stat().st_size for p in DATA_DIR.iterdir() if p.is_file())
    print(f"wrote {DATA_DIR.relative_to(REPO_ROOT)} ({total / 1024:.0f} KiB in all)")
    print(f"done in {time.time() - start:.0f} s")


# --------------------------------------------------------------------------- FusionBench side


def driver() -> None:
    """Inside the FusionBench venv: run its OPCM over the fixtures and save the merges."""
    from importlib.metadata import version

    import lightning as L
    import transformers
    from fusion_bench.method.opcm.opcm_general import OPCM
    from fusion_bench.modelpool import BaseModelPool

    torch.set_num_threads(1)  # keep the float32 SVD path fixed across machines

    def load(name: str) -> TinyViT:
        model = TinyViT()
        model.load_state_dict(load_file(str(DATA_DIR / f"{name}.safetensors")), strict=True)
        return model.eval()

    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    for step in STEPS:
        names = [f"task_{t}" for t in range(step)]
        models: dict[str, nn.Module] = {"_pretrained_": load("base")}
        models.update({n: load(n) for n in names})  # fresh copies: OPCM mutates them
        pool = BaseModelPool(models)
        assert pool.model_names == names, pool.model_names
        algo = OPCM(
            alpha=ALPHA,
            shuffle_order=False,
            seed=None,
            save_on_every_step=False,
            evaluate_on_every_step=False,
        )
        algo.fabric = fabric  # no loggers: log_dir is None, fabric.log is a no-op
        merged = algo.run(pool)
        out = {k: v.detach().to(torch.float32).contiguous() for k, v in merged.state_dict().items()}
        save_file(out, str(DATA_DIR / f"expected_step{step}.safetensors"))
    meta = {
        "fusion_bench": version("fusion-bench"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": L.__version__,
    }
    print("META " + json.dumps(meta))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--driver", action="store_true", help="internal: run inside the venv")
    if parser.parse_args().driver:
        driver()
    else:
        main()
