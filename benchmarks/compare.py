"""Every peer, one run: mergeflow beside FusionBench's OPCM, mergekit and a plain reading baseline.

Run from the repository root (the CPU run; benchmarks/README.md gives its measured time)::

    .venv/bin/python benchmarks/compare.py                    # the CPU run (see "all" below)
    .venv/bin/python benchmarks/compare.py --suite every      # every suite, every table
    .venv/bin/python benchmarks/compare.py --suite llama-1b-bf16 --only continual   # Llama folds
    .venv/bin/python benchmarks/compare.py --suite vit-b32    # one suite
    .venv/bin/python benchmarks/compare.py --suite accuracy   # the ill-conditioned accuracy fixture

``--suite vit-b32-dop`` times ``dop`` and ``nufilt`` beside FusionBench's DOP
(``compare_dop.py`` says how; ``--dop-steps``). ``--threads`` adds a 1 worker x 2 threads OPCM fold on vit-b32 (the thread choice),
``--llama-opcm`` an OPCM fold of 2 checkpoints on the Llama suites (once; it runs their
continual-fold table, also in the CPU run), and
``--ties-rounds`` sets the rounds of the TIES merges at Llama size (default 1: mergekit's
takes about 6 minutes there). ``llama-1b-fp32`` is left out of the CPU run: its 22 GB of
inputs are more than the page cache holds, so it times the disk more than the merge. The
CPU run (``--suite all``, the default) is the tables the targets are read from: vit-b32's
continual folds beside FusionBench, the accuracy fixture, and llama-1b-bf16's batch merges
beside mergekit. It leaves out two tables that ``--suite <name>`` runs: llama-1b-bf16's
continual folds (about 9 minutes; ``--suite llama-1b-bf16 --only continual``) and vit-b32's
batch merges (about 4 minutes; mergekit cannot merge that model, so only the reading
baseline stands beside them: ``--suite vit-b32 --only batch``).

Suites (random weights with real architectures' tensor names and shapes, written once under
``benchmarks/_work/compare/<suite>/`` and reused):

* ``vit-b32``: the CLIP ViT-B/32 vision tower (87.5 M parameters, 72 projected matrices),
  float32, base + 8 checkpoints. Task vectors: a few shared and task-specific rank-1
  directions plus dense noise (the singular spectrum of a merged update decays, as real
  fine-tunes' do).
* ``accuracy``: a 4-layer ViT-shaped model whose task vectors share directions of equal
  strength, so the merged updates have clustered singular values (OPCM's ill-conditioned
  case), 6 checkpoints; for the error of each OPCM against the exact float64 OPCM.
* ``llama-1b-bf16`` and ``llama-1b-fp32``: a TinyLlama-shaped model (22 layers, hidden 2048,
  intermediate 5632, 4 key/value heads, vocab 32000: 1.1 B parameters), base + 4 checkpoints
  (dense Gaussian deltas).

Systems, each its own process under ``/usr/bin/time -v`` (peak RSS), timed inside the
process (``seconds`` excludes the interpreter and imports), alternating the order every
round, ``--rounds`` rounds (default 3), medians reported:

* ``mergeflow opcm`` and ``mergeflow task_arithmetic``: the streaming engine over every
  checkpoint (open the inputs, fold, commit each state), the way ``mergeflow state fold``
  runs it; seconds per fold = seconds / checkpoints.
* ``fusionbench opcm``: FusionBench 0.2.33's ``opcm_general.OPCM`` in its own venv, from
  building its model pool to the merged model in memory.
* ``reading baseline``: for each checkpoint, read the fold's inputs once (base, checkpoint,
  previous output) and write its output once: the storage limit of a linear continual fold.
* ``mergekit ties`` / ``mergekit task_arithmetic`` (mergekit 0.1.5, its own venv, 100M shards)
  against ``mergeflow batch_ties`` / ``batch_task_arithmetic`` through ``mergeflow merge``,
  and the batch reading baseline (read base and every checkpoint once, write one output).

Errors: worst per-tensor ``‖θ − θ_ref‖ / ‖θ_ref − θ₀‖`` against the exact float64 OPCM
(mergeflow's engine in float64 with ``decomposition=svd64``, itself checked against a
full-SVD reference in ``tests/test_opcm_math.py``).

What could not run at a size, and why, is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "compare"
FB_VENV = HERE / ".venv-fusionbench"
MK_VENV = HERE / ".venv-mergekit"
ALPHA = 0.5

# ------------------------------------------------------------------------------ layouts


def clip_vit_b32(layers: int = 12, d: int = 768, ff: int = 3072) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of CLIPVisionModel (ViT-B/32 by default)."""
    p = "vision_model."
    t: dict[str, tuple[int, ...]] = {
        p + "embeddings.class_embedding": (d,),
        p + "embeddings.patch_embedding.weight": (d, 3, 32, 32),
        p + "embeddings.position_embedding.weight": (50, d),
        p + "pre_layrnorm.weight": (d,),
        p + "pre_layrnorm.bias": (d,),
    }
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{q}self_attn.{proj}.weight"] = (d, d)
            t[f"{q}self_attn.{proj}.bias"] = (d,)
        for ln in ("layer_norm1", "layer_norm2"):
            t[f"{q}{ln}.weight"] = (d,)
            t[f"{q}{ln}.bias"] = (d,)
        t[f"{q}mlp.fc1.weight"] = (ff, d)
        t[f"{q}mlp.fc1.bias"] = (ff,)
        t[f"{q}mlp.fc2.weight"] = (d, ff)
        t[f"{q}mlp.fc2.bias"] = (d,)
    t[p + "post_layernorm.weight"] = (d,)
    t[p + "post_layernorm.bias"] = (d,)
    return t


def llama_1b(
    layers: int = 22, d: int = 2048, ff: int = 5632, kv: int = 256, vocab: int = 32000
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM, TinyLlama-1.1B by default (``kv``: the
    key/value projections' rows; ``kv=d`` is Llama-2 without grouped key/value heads)."""
    t: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        q = f"model.layers.{i}."
        t[q + "self_attn.q_proj.weight"] = (d, d)
        t[q + "self_attn.k_proj.weight"] = (kv, d)
        t[q + "self_attn.v_proj.weight"] = (kv, d)
        t[q + "self_attn.o_proj.weight"] = (d, d)
        t[q + "mlp.gate_proj.weight"] = (ff, d)
        t[q + "mlp.up_proj.weight"] = (ff, d)
        t[q + "mlp.down_proj.weight"] = (d, ff)
        t[q + "input_layernorm.weight"] = (d,)
        t[q + "post_attention_layernorm.weight"] = (d,)
    t["model.norm.weight"] = (d,)
    t["lm_head.weight"] = (vocab, d)
    return t


SUITES: dict[str, dict] = {
    "vit-b32": {"layout": "clip", "dtype": "float32", "n": 8, "deltas": "structured"},
    "accuracy": {"layout": "clip-small", "dtype": "float32", "n": 6, "deltas": "clustered"},
    "llama-1b-bf16": {"layout": "llama", "dtype": "bfloat16", "n": 4, "deltas": "dense"},
    "llama-1b-fp32": {"layout": "llama", "dtype": "float32", "n": 4, "deltas": "dense"},
}


def layout_of(name: str) -> dict[str, tuple[int, ...]]:
    """The tensor layout of a suite."""
    if name == "clip":
        return clip_vit_b32()
    if name == "clip-small":
        return clip_vit_b32(layers=4, d=256, ff=1024)
    if name == "clip-1":
        return clip_vit_b32(layers=1)
    return llama_1b()


# ------------------------------------------------------------------------------- inputs


def _delta(shape: tuple[int, ...], kind: str, task: int, g: torch.Generator) -> torch.Tensor:
    """One checkpoint's task vector for one tensor (see the module doc)."""
    if kind == "dense" or len(shape) != 2:
        return 0.002 * torch.randn(shape, generator=g)
    m, n = shape
    shared = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))  # same for all tasks
    out = 0.0005 * torch.randn(shape, generator=g)
    if kind == "structured":
        for j in range(4):  # shared directions, decaying strengths, task-dependent mixing
            a, b = torch.randn(m, 1, generator=shared), torch.randn(1, n, generator=shared)
            out += (
                (0.02 / (j + 1))
                * (0.5 + torch.rand(1, generator=g))
                * (a @ b)
                / math.sqrt(m * n) ** 0.5
            )
        a, b = torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g)
        out += 0.01 * (a @ b) / math.sqrt(m * n) ** 0.5
        return out
    # clustered: 8 shared directions of EQUAL strength in every task, so the merged update's
    # leading singular values come in near-ties that only float64 separates
    u, _ = torch.linalg.qr(torch.randn(m, 8, generator=shared))
    v, _ = torch.linalg.qr(torch.randn(n, 8, generator=shared))
    w = 0.05 * (1 + 1e-5 * torch.randn(8, generator=g))
    return out * 0.002 + (u * w) @ v.T


def _base_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base's tensor, regenerated from its name (so nothing whole is ever held)."""
    if key.endswith("norm.weight") or ("layer_norm" in key and key.endswith("weight")):
        return torch.ones(shape)
    if key.endswith("bias"):
        return torch.zeros(shape)
    return 0.02 * torch.randn(
        shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode()))
    )


def build(suite: str) -> tuple[Path, list[Path]]:
    """Write base.safetensors and ckpt_{i}.safetensors for a suite, streaming (reused when complete)."""
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.shard_writer import ShardedWriter

    spec = SUITES[suite]
    folder = WORK / suite
    base = folder / "base.safetensors"
    cks = [folder / f"ckpt_{i}.safetensors" for i in range(spec["n"])]
    marker = folder / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec and base.exists():
        return base, cks
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, spec["dtype"])
    layout = layout_of(spec["layout"])
    print(
        f"building {suite}: {sum(math.prod(s) for s in layout.values()) / 1e6:.1f} M parameters",
        flush=True,
    )
    for i, path in enumerate([base, *cks]):
        w = ShardedWriter(StoreSink(LocalStore(folder)), max_shard_size=2**40, prefix=path.stem)
        g = torch.Generator().manual_seed(100 + i)
        for k, shape in layout.items():
            t = _base_tensor(k, shape)
            if i > 0:
                t += _delta(shape, spec["deltas"], i - 1, g)
            w.add(k, t.to(dtype))
        w.commit({"format": "pt"})
    marker.write_text(json.dumps(spec))
    return base, cks


# ------------------------------------------------------------------------------ drivers
# Each driver runs in its own process and prints one JSON line {"seconds": ...}.


def drive_mergeflow(method: str, base: str, cks: list[str], out: str, params: str) -> None:
    """Fold every checkpoint into a state under ``out`` with mergeflow's streaming engine."""
    from mergeflow.architecture import resolve_projection
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef, FoldOptions
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.schemes import open_checkpoint

    t0 = time.perf_counter()
    b = open_checkpoint(base)
    info = engine.new_state(
        method,
        json.loads(params),
        BaseRef(uri=base, digest="-"),
        resolve_projection(b.reader, None),
        FoldOptions(),
    )
    store = LocalStore(out)
    store.delete_prefix("")
    states.init_state(store, info)
    for i, ck in enumerate(cks):
        c = open_checkpoint(ck, base=b.reader)
        states.fold_into(store, store, b.reader, c, checkpoint_id=f"c{i}", digest=f"d{i}")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def drive_reading(base: str, cks: list[str], out: str, widen: bool = False) -> None:
    """Read each fold's inputs once (base, checkpoint, previous output), write its output once;
    ``widen``: write float32 outputs, as a state kept at the compute precision must."""
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.storage.shard_writer import ShardedWriter

    t0 = time.perf_counter()
    store = LocalStore(out)
    store.delete_prefix("")
    prev = None
    for i, ck in enumerate(cks):
        b, c = open_checkpoint(base).reader, open_checkpoint(ck).reader
        p = open_checkpoint(prev).reader if prev else None
        w = ShardedWriter(StoreSink(store, f"step{i}"))
        for k in b.keys():
            b.get(k)
            t = c.get(k)
            if p is not None:
                p.get(k)
            w.add(k, t.float() if widen and t.is_floating_point() else t)
        w.commit()
        prev = str(Path(out) / f"step{i}" / "model.safetensors")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def drive_reading_batch(base: str, cks: list[str], out: str) -> None:
    """Read the base and every checkpoint once, write one output: a batch merge's storage limit."""
    from mergeflow.storage.objects import LocalStore, StoreSink
    from mergeflow.storage.schemes import open_checkpoint
    from mergeflow.storage.shard_writer import ShardedWriter

    t0 = time.perf_counter()
    store = LocalStore(out)
    store.delete_prefix("")
    readers = [open_checkpoint(p).reader for p in [base, *cks]]
    w = ShardedWriter(StoreSink(store))
    for k in readers[0].keys():
        ts = [r.get(k) for r in readers]
        w.add(k, ts[0])
        del ts
    w.commit()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def module_from_tensors(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module tree with these parameter names: 2-D weights (+ bias) become nn.Linear,
    except embeddings (as in the real architectures, which FusionBench does not project).

    Parameters that sit directly on a module that also has children are moved to a leaf
    child ``_direct`` (FusionBench merges leaf modules only); :func:`tensors_of` maps back.
    """
    from torch import nn

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        path, _, pname = k.rpartition(".")
        groups.setdefault(path, {})[pname] = v
    root = nn.Module()

    def node(path: str) -> nn.Module:
        mod = root
        for part in [x for x in path.split(".") if x]:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        return mod

    for path, params in groups.items():
        w = params.get("weight")
        linear = (
            "embed" not in path.rsplit(".", 1)[-1]
        )  # embeddings are nn.Embedding in the real model
        if set(params) <= {"weight", "bias"} and w is not None and w.dim() == 2 and linear:
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
            parent, _, name = path.rpartition(".")
            node(parent).add_module(name, lin)
            target = lin
        else:
            has_children = any(q.startswith(path + ".") for q in groups)
            target = node(path + "._direct" if has_children else path)
        for pname, v in params.items():
            target.register_parameter(pname, nn.Parameter(v.clone(), requires_grad=False))
    return root.eval()


def tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their original names (undoing ``_direct``)."""
    return {
        k.replace("._direct.", "."): v.detach().contiguous() for k, v in module.state_dict().items()
    }


def load_module(path: str) -> torch.nn.Module:
    """FusionBench's model-pool loader: a safetensors file as an nn.Module tree (float32)."""
    from safetensors.torch import load_file

    return module_from_tensors({k: v.float() for k, v in load_file(path).items()})


def drive_fusionbench(base: str, cks: list[str], out: str) -> None:
    """FusionBench's OPCM (opcm_general) on CPU, from building its model pool to the merged model."""
    import lightning as L
    from fusion_bench.method.opcm.opcm_general import OPCM
    from fusion_bench.modelpool import BaseModelPool

    target = "compare.load_module"
    t0 = time.perf_counter()
    models = {"_pretrained_": {"_target_": target, "path": base}}
    models |= {f"ckpt_{i}": {"_target_": target, "path": p} for i, p in enumerate(cks)}
    algo = OPCM(
        alpha=ALPHA,
        shuffle_order=False,
        seed=None,
        save_on_every_step=False,
        evaluate_on_every_step=False,
    )
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    merged = algo.run(BaseModelPool(models))
    seconds = time.perf_counter() - t0
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors_of(merged), str(Path(out) / "model.safetensors"))
    print(json.dumps({"seconds": seconds}))


# ---------------------------------------------------------------------- running systems


def _load_avg() -> float:
    return os.getloadavg()[0]


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a driver under /usr/bin/time -v: its inner seconds, wall seconds and peak RSS (MiB)."""
    load = _load_avg()
    t0 = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env or os.environ.copy()
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith('{"seconds"')]
    inner = json.loads(lines[-1])["seconds"] if lines else wall
    return {"seconds": inner, "wall": wall, "rss": rss, "load": load}


def _self(driver: str, *args: str, python: str = sys.executable) -> list[str]:
    return [python, str(HERE / "compare.py"), "--driver", driver, *args]


def _fb_python() -> str:
    import venvs

    return str(
        venvs.ensure_venv(
            FB_VENV,
            "import fusion_bench",
            ["fusion-bench==0.2.33", "transformers<5", "datasets<4", "huggingface_hub<1"],
        )
    )


def _mk_python() -> str:
    import venvs

    return str(venvs.ensure_venv(MK_VENV, "import mergekit.merge", ["mergekit==0.1.5"]))


def _hf_config(layout: str, dtype: str) -> dict:
    """The transformers config.json of a suite's layout (mergekit needs one per model)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    if layout == "llama":
        d = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ).to_dict()
        d["architectures"] = ["LlamaForCausalLM"]
    else:
        small = layout == "clip-small"
        d = CLIPVisionConfig(
            hidden_size=256 if small else 768,
            intermediate_size=1024 if small else 3072,
            num_hidden_layers=4 if small else 12,
            patch_size=32,
        ).to_dict()
        d["architectures"] = ["CLIPVisionModel"]
    d["torch_dtype"] = dtype
    return d


def _mergekit_cmd(method: str, base: Path, cks: list[Path], out: Path, dtype: str) -> list[str]:
    """mergekit-yaml over single-file models (each put in its own folder with a config)."""
    folder = out.parent / f"mk-inputs-{base.parent.name}"
    config = json.dumps(_hf_config(SUITES[base.parent.name]["layout"], dtype))
    models = []
    for p in [base, *cks]:
        d = folder / p.stem
        if not (d / "model.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            os.link(p, d / "model.safetensors")
        (d / "config.json").write_text(config)  # mergekit reads model_type and architectures
        models.append(d)
    if method == "task_arithmetic":
        params, norm = "weight: 0.3", "false"
    else:
        params, norm = "weight: 1.0\n      density: 0.2", "true"
    body = "".join(f"  - model: {c}\n    parameters:\n      {params}\n" for c in models[1:])
    cfg = out.parent / f"mk-{method}.yml"
    cfg.write_text(
        f"merge_method: {method}\nbase_model: {models[0]}\nmodels:\n{body}"
        f"parameters:\n  normalize: {norm}\ndtype: {dtype}\n"
    )
    return mergekit_argv(cfg, out)


def mergekit_argv(cfg: Path, out: Path) -> list[str]:
    """``mergekit-yaml`` (its own venv) on ``cfg`` into ``out``, on the CPU, 100M shards."""
    mk = Path(_mk_python()).parent / "mergekit-yaml"
    return [
        str(mk),
        str(cfg),
        str(out),
        "--device",
        "cpu",
        "--no-copy-tokenizer",
        "--out-shard-size",
        "100M",
        "--allow-crimes",
        "--lazy-unpickle",
    ]


def _worst_error(out: Path, ref: Path, base: Path) -> float:
    """Worst per-tensor ‖θ − θ_ref‖ / ‖θ_ref − θ₀‖ over the merged float tensors."""
    a, r, b = (safe_open(str(_model_file(p)), "pt") for p in (out, ref, base))
    worst = 0.0
    for k in b.keys():
        t0 = b.get_tensor(k).double()
        tr = r.get_tensor(k).double()
        den = float((tr - t0).norm())
        if den > 0:
            worst = max(worst, float((a.get_tensor(k).double() - tr).norm()) / den)
    return worst


def _tensor_count(p: Path) -> int:
    """Tensors in a safetensors file or in every ``*.safetensors`` of a folder."""
    files = [p] if p.suffix == ".safetensors" else sorted(p.glob("*.safetensors"))
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            n += len(list(h.keys()))
    return n


def _model_file(p: Path) -> Path:
    return p if p.suffix == ".safetensors" else p / "model.safetensors"


def export_state(state_dir: Path, base: Path, out: Path) -> None:
    """Write the merged model of a state (outside any timing)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mergeflow",
            "state",
            "export",
            "--state",
            str(state_dir),
            "--out",
            str(out),
            "--no-progress",
            "--overwrite",
        ],
        check=True,
        capture_output=True,
    )


def reference(suite: str, base: Path, cks: list[Path], n: int) -> Path:
    """The exact float64 OPCM over the first ``n`` checkpoints (cached)."""
    out = WORK / suite / f"reference-opcm-{n}"
    if (out / "model.safetensors").exists():
        return out
    print(f"  exact float64 OPCM reference over {n} checkpoints (once)…", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mergeflow",
            "merge",
            "--base",
            str(base),
            "--method",
            "opcm",
            "--param",
            "decomposition=svd64",
            "--compute-dtype",
            "float64",
            "--dtype",
            "float64",
            "--no-progress",
            "--overwrite",
            "--out",
            str(out),
            *map(str, cks[:n]),
        ],
        check=True,
    )
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _rounds(
    systems: dict[str, list[str] | tuple[list[str], dict[str, str]]], rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Run every system ``rounds`` times, alternating the order each round."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            spec = systems[name]
            cmd, env = spec if isinstance(spec, tuple) else (spec, None)
            try:
                res = run_timed(cmd, env)
            except RuntimeError as e:
                print(f"  round {r + 1}: {name} FAILED: {str(e).splitlines()[0]}", flush=True)
                continue
            results[name].append(res)
            print(
                f"  round {r + 1}: {name}: {res['seconds']:.2f} s inside, peak RSS "
                f"{res['rss']:.0f} MiB (load {res['load']:.1f})",
                flush=True,
            )
    return results


def _row(name: str, runs: list[dict[str, float]], n: int, extra: str = "") -> dict:
    if not runs:
        return {"system": name, "per_fold": math.nan, "rss": math.nan, "runs": 0, "note": extra}
    return {
        "system": name,
        "per_fold": median([r["seconds"] for r in runs]) / n,
        "rss": median([r["rss"] for r in runs]),
        "runs": len(runs),
        "load": median([r["load"] for r in runs]),
        "note": extra,
    }


def suite_continual(suite: str, rounds: int, skip_fb: bool, threads: bool = False) -> list[dict]:
    """OPCM and task arithmetic folds beside FusionBench and the reading baseline."""
    base, cks = build(suite)
    n = len(cks)
    out = WORK / suite / "out"
    args = [str(base), *map(str, cks)]
    systems = {
        "mergeflow opcm": _self("mergeflow", "opcm", str(out / "opcm"), "{}", *args),
        "mergeflow task_arithmetic": _self(
            "mergeflow", "task_arithmetic", str(out / "ta"), "{}", *args
        ),
        "reading baseline (fold)": _self("reading", str(out / "read"), *args),
    }
    if threads:  # the thread choice: 2 workers x 1 thread (default) vs 1 x 2
        one = _self("mergeflow", "opcm", str(out / "opcm1"), "{}", *args)
        systems["mergeflow opcm, 1 worker x 2 threads"] = (
            one,
            os.environ | {"MERGEFLOW_FOLD_WORKERS": "1"},
        )
    if suite == "accuracy":
        systems["mergeflow opcm svd32"] = _self(
            "mergeflow", "opcm", str(out / "opcm32"), '{"decomposition": "svd32"}', *args
        )
    note_fb = ""
    if skip_fb:
        note_fb = "skipped (--skip-fusionbench)"
    else:
        systems["fusionbench opcm"] = _self(
            "fusionbench", str(out / "fb"), *args, python=_fb_python()
        )
    res = _rounds(systems, rounds)
    ref = reference(suite, base, cks, n)
    rows = []
    for name, runs in res.items():
        row = _row(name, runs, n, note_fb if name == "fusionbench opcm" else "")
        folder = {"mergeflow opcm": "opcm", "mergeflow opcm svd32": "opcm32"}.get(name)
        if folder and runs:
            export_state(out / folder, base, out / f"{folder}-model")
            row["error"] = _worst_error(out / f"{folder}-model", ref, base)
        if name == "fusionbench opcm" and runs:
            row["error"] = _worst_error(out / "fb", ref, base)
        rows.append(row)
    return rows


def suite_batch(
    suite: str,
    rounds: int,
    skip_mk: bool,
    methods: list[str] | None = None,
    ties_rounds: int | None = None,
) -> list[dict]:
    """Batch task arithmetic and TIES beside mergekit and the batch reading baseline."""
    base, cks = build(suite)
    dtype = SUITES[suite]["dtype"]
    out = WORK / suite / "out"
    mf = [
        sys.executable,
        "-m",
        "mergeflow",
        "merge",
        "--base",
        str(base),
        "--no-progress",
        "--overwrite",
        "--device",
        "cpu",
        # the other-base screen reads every checkpoint once more for a batch merge; mergekit
        # has no such check, so the comparison (and the figures before it existed) leave it off
        "--max-task-vector-ratio",
        "none",
    ]
    ck = [*map(str, cks)]
    systems = {
        "mergeflow batch_task_arithmetic": [
            *mf,
            "--method",
            "batch_task_arithmetic",
            "--out",
            str(out / "bta"),
            *ck,
        ],
        "mergeflow batch_ties": [
            *mf,
            "--method",
            "batch_ties",
            "--param",
            "scale=1.0",
            "--param",
            "merge_func=mean",
            "--out",
            str(out / "bties"),
            *ck,
        ],
        "reading baseline (batch)": _self("reading-batch", str(out / "readb"), str(base), *ck),
    }
    if not skip_mk:
        systems["mergekit task_arithmetic"] = _mergekit_cmd(
            "task_arithmetic", base, cks, out / "mk-ta", dtype
        )
        systems["mergekit ties"] = _mergekit_cmd("ties", base, cks, out / "mk-ties", dtype)
    wanted = methods or ["task_arithmetic", "ties"]
    systems = {
        name: cmd
        for name, cmd in systems.items()
        if name.startswith("reading") or name.rsplit(" ", 1)[-1].removeprefix("batch_") in wanted
    }
    ties = {name: cmd for name, cmd in systems.items() if name.endswith("ties")}
    res = _rounds({n: c for n, c in systems.items() if n not in ties}, rounds)
    if ties:
        res |= _rounds(ties, ties_rounds if ties_rounds is not None else rounds)
    expected = _tensor_count(base)
    outputs = {
        "mergeflow batch_task_arithmetic": "bta",
        "mergeflow batch_ties": "bties",
        "mergekit task_arithmetic": "mk-ta",
        "mergekit ties": "mk-ties",
    }
    for name, folder in outputs.items():
        got = _tensor_count(out / folder)
        if res.get(name) and got != expected:  # an exit code 0 that merged nothing is no timing
            print(
                f"  {name}: wrote {got} of the base's {expected} tensors; its timings are dropped"
            )
            res[name] = []
    # batch rows report wall seconds of the whole process per merge (both tools' CLIs)
    rows = []
    for name, runs in res.items():
        for r in runs:
            if not name.startswith("reading"):
                r["seconds"] = r["wall"]
        row = _row(name, runs, 1)
        row["per_merge"] = row.pop("per_fold")
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict], key: str = "per_fold") -> None:
    """One markdown table; ratios against the peer named in each row's group."""
    print(f"\n### {title}\n")
    unit = "s per fold" if key == "per_fold" else "s per merge (process wall)"
    print(f"| system | {unit} (median) | peak RSS MiB | error vs float64 OPCM | runs | load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = f"{r['error']:.2e}" if "error" in r else "-"
        print(
            f"| {r['system']} | {r[key]:.2f} | {r['rss']:.0f} | {err} | {r['runs']} | "
            f"{r.get('load', math.nan):.1f} |" + (f" {r['note']}" if r.get("note") else "")
        )
    by = {r["system"]: r for r in rows}

    def ratio(a: str, b: str, what: str = key) -> None:
        if a in by and b in by and by[b][what] and not math.isnan(by[b][what]):
            print(
                f"- {a} / {b}: time {by[a][what] / by[b][what]:.2f}x, "
                f"peak RSS {by[a]['rss'] / by[b]['rss']:.2f}x"
            )

    ratio("mergeflow opcm", "fusionbench opcm")
    if "error" in by.get("mergeflow opcm", {}) and "error" in by.get("fusionbench opcm", {}):
        print(
            f"- error: FusionBench / mergeflow = "
            f"{by['fusionbench opcm']['error'] / by['mergeflow opcm']['error']:.1f}x"
        )
    for base_row in ("reading baseline (fold)", "reading baseline (fold, float32 output)"):
        if base_row in by and "mergeflow task_arithmetic" in by:
            b, t = by[base_row], by["mergeflow task_arithmetic"]
            print(f"- task_arithmetic fold throughput = {b[key] / t[key]:.0%} of {base_row}'s")
    ratio("mergeflow batch_task_arithmetic", "mergekit task_arithmetic", "per_merge")
    ratio("mergeflow batch_ties", "mergekit ties", "per_merge")
    if "reading baseline (batch)" in by and "mergeflow batch_task_arithmetic" in by:
        b, t = by["reading baseline (batch)"], by["mergeflow batch_task_arithmetic"]
        print(
            f"- batch_task_arithmetic: reading baseline {b['per_merge']:.1f} s inside vs "
            f"{t['per_merge']:.1f} s process wall"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--suite",
        choices=[*SUITES, "vit-b32-dop", "all", "every"],
        default="all",
        help="all (the CPU run): vit-b32 continual, accuracy, llama-1b-bf16 batch; "
        "every: every suite and table",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-fusionbench", action="store_true")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument(
        "--batch-methods",
        default="task_arithmetic,ties",
        help="batch methods to compare with mergekit (comma-separated)",
    )
    ap.add_argument(
        "--only",
        choices=["continual", "batch"],
        help="only the continual-fold or only the batch-merge table of each suite",
    )
    ap.add_argument(
        "--ties-rounds",
        type=int,
        help="rounds of the TIES merges at Llama size (default 1: mergekit's takes about 6 minutes)",
    )
    ap.add_argument(
        "--threads",
        action="store_true",
        help="vit-b32: also fold with 1 worker x 2 threads (the thread choice)",
    )
    ap.add_argument(
        "--llama-opcm",
        action="store_true",
        help="Llama suites: also fold 2 checkpoints with OPCM, once (about 4-5 minutes); "
        "runs the Llama continual-fold table, also in the CPU run",
    )
    ap.add_argument(
        "--dop-steps",
        type=int,
        default=20,
        help="vit-b32-dop: Adam steps of both DOPs in the time table (theirs: 200)",
    )
    ap.add_argument(
        "--dop-tables",
        default="time,memory",
        help="vit-b32-dop: which tables (time, memory or both)",
    )
    ap.add_argument("--driver", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.driver:
        d = args.driver
        if d == "mergeflow":
            drive_mergeflow(rest[0], rest[3], rest[4:], rest[1], rest[2])
        elif d in ("reading", "reading-f32"):
            drive_reading(rest[1], rest[2:], rest[0], widen=d == "reading-f32")
        elif d == "reading-batch":
            drive_reading_batch(rest[1], rest[2:], rest[0])
        elif d == "fusionbench":
            sys.path.insert(0, str(HERE))
            drive_fusionbench(rest[1], rest[2:], rest[0])
        elif d == "fusionbench-dop":
            sys.path.insert(0, str(HERE))
            import compare_dop

            compare_dop.drive_fusionbench_dop(rest[2], rest[3:], rest[0], int(rest[1]))
        return
    sys.path.insert(0, str(HERE))
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load {_load_avg():.1f}")
    if args.suite in ("all", "every"):
        suites = [x for x in SUITES if args.suite == "every" or x != "llama-1b-fp32"]
    else:
        suites = [args.suite]
    if args.suite == "vit-b32-dop":
        import compare_dop

        compare_dop.suite_dop(args.rounds, args.dop_steps, args.skip_fusionbench, args.dop_tables)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        return
    cpu_run = args.suite == "all"  # the tables the targets are read from (module doc)
    for suite in suites:
        print(f"\n== {suite} == (at {time.perf_counter() - t0:.0f} s)", flush=True)
        continual, batch = args.only != "batch", args.only != "continual"
        if continual and suite in ("vit-b32", "accuracy"):
            rows = suite_continual(
                suite, args.rounds, args.skip_fusionbench, args.threads and suite == "vit-b32"
            )
            print_table(f"{suite}: continual folds", rows)
        if batch and (suite.startswith("llama") or (suite == "vit-b32" and not cpu_run)):
            big = suite.startswith("llama")
            rows = suite_batch(
                suite,
                args.rounds,
                args.skip_mergekit,
                args.batch_methods.split(","),
                ties_rounds=(args.ties_rounds or 1) if big else args.ties_rounds,
            )
            print_table(f"{suite}: batch merges", rows, key="per_merge")
        if continual and suite.startswith("llama") and (not cpu_run or args.llama_opcm):
            rows = suite_llama_folds(suite, args.rounds, args.llama_opcm)
            print_table(f"{suite}: continual folds", rows)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def suite_llama_folds(suite: str, rounds: int, opcm: bool) -> list[dict]:
    """Task-arithmetic folds and the reading baselines (rounds); with ``opcm``, OPCM once over
    2 checkpoints."""
    base, cks = build(suite)
    out = WORK / suite / "out"
    args = [str(base), *map(str, cks)]
    res = _rounds(
        {
            "mergeflow task_arithmetic": _self(
                "mergeflow", "task_arithmetic", str(out / "ta"), "{}", *args
            ),
            "reading baseline (fold)": _self("reading", str(out / "read"), *args),
            # the state is float32: a 16-bit model's fold reads and writes float32 states
            "reading baseline (fold, float32 output)": _self(
                "reading-f32", str(out / "read32"), *args
            ),
        },
        rounds,
    )
    rows = [_row(name, runs, len(cks)) for name, runs in res.items()]
    if opcm:
        res_opcm = _rounds(
            {
                "mergeflow opcm (2 checkpoints, 1 round)": _self(
                    "mergeflow", "opcm", str(out / "opcm"), "{}", str(base), *map(str, cks[:2])
                )
            },
            1,
        )
        for name, runs in res_opcm.items():
            rows.append(
                _row(name, runs, 2, "1 round: a projected fold of 154 matrices up to 5632x2048")
            )
    rows.append(
        {
            "system": "fusionbench opcm",
            "per_fold": math.nan,
            "rss": math.nan,
            "runs": 0,
            "note": "not run: it holds pretrained, merged and task models as float32 "
            "modules (3 x 4.4 GB) and runs a full float32 SVD per matrix; "
            "beyond this machine's 40-minute CPU budget",
        }
    )
    return rows


if __name__ == "__main__":
    main()
