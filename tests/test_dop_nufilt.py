"""DOP and NUFILT: exact math on tiny tensors against float64 references written from the
authors' code (autograd losses, their loops), bad parameters, and ``merge`` on a folder, an S3
prefix and a LoRA adapter."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import finetune, fold_in_memory, tiny_state
from safetensors.torch import load_file, save_file

from mergeflow.errors import ConfigError
from mergeflow.merging import engine
from mergeflow.merging.methods.dop import min_norm_weight, split_rank
from mergeflow.merging.projection import by_name_rules
from mergeflow.merging.state import BaseRef, FoldOptions
from mergeflow.merging.tensors import DictReader

F64 = FoldOptions(compute_dtype="float64")


def models(n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = tiny_state(0, torch.float64)
    return base, [finetune(base, i, scale=0.05) for i in range(n)]


def projected(base: dict[str, torch.Tensor]) -> set[str]:
    br = DictReader(base, "base")
    return set(by_name_rules({k: br.meta(k) for k in br.keys()}).projected)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


# ---- DOP: FusionBench's ContinualDOP/DOPMerging loop, written here with autograd ----


def fb_dop_weight(w0, finetuned, lr, steps, alpha, beta, eps, space="uv", mgda=True, ema=True):
    """FusionBench's ``_optimize_weight`` (absolute weights, full SVD, autograd, 3 passes/step)."""
    merged = torch.nn.Parameter(sum(finetuned) / len(finetuned))
    proj = []
    for w in finetuned:
        u, s, vh = torch.linalg.svd(w - w0, full_matrices=True)
        r = int(torch.searchsorted(s.cumsum(0) / s.sum(), torch.tensor([eps], dtype=s.dtype)))
        proj.append((u[:, :r], s[:r], vh.T[:, :r]))

    def loss_i(i):
        u, s, v = proj[i]
        d = merged - finetuned[i]
        lu = torch.linalg.matrix_norm(torch.diag(s) @ u.T @ d) ** 2
        lv = torch.linalg.matrix_norm(d @ v @ torch.diag(s)) ** 2
        return {"uv": lu + lv, "u": lu, "v": lv}[space]

    opt = torch.optim.Adam([merged], lr=lr)
    sol = [alpha, 1 - alpha]
    for _ in range(steps):
        if mgda:
            grads, losses = [], []
            for i in range(2):
                li = loss_i(i)
                opt.zero_grad()
                li.backward()
                grads.append(merged.grad.clone() / float(li.detach()))
                losses.append(float(li.detach()))
            v11, v12, v22 = (float((a * b).sum()) for a, b in ((grads[0], grads[0]), (grads[0], grads[1]), (grads[1], grads[1])))  # fmt: skip
            if v12 >= v11:
                g = 0.999
            elif v12 >= v22:
                g = 0.001
            else:
                g = -(v12 - v22) / (v11 + v22 - 2 * v12)
            sol = [beta * sol[0] + (1 - beta) * g, beta * sol[1] + (1 - beta) * (1 - g)] if ema else [g, 1 - g]  # fmt: skip
        loss = sol[0] * loss_i(0) + sol[1] * loss_i(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merged.detach()


def fb_dop(base, cks, proj, **p):
    """FusionBench's continual loop: the first model as is, then DOP with the merged model."""
    merged = dict(cks[0])
    for ck in cks[1:]:
        out = {}
        for k in base:
            if k in proj:
                out[k] = fb_dop_weight(base[k], [merged[k], ck[k]], **p)
            elif base[k].is_floating_point():
                out[k] = (merged[k] + ck[k]) / 2
            else:
                out[k] = base[k]
        merged = out
    return merged


DOP_DEFAULTS = {"lr": 1e-4, "steps": 200, "alpha": 0.8, "beta": 0.999, "eps": 0.99999}


@pytest.mark.parametrize(
    "params, ref",
    [
        ({}, {}),
        ({"lr": 0.01, "steps": 30, "ema": False}, {"lr": 0.01, "steps": 30, "ema": False}),
        (
            {"lr": 0.01, "steps": 30, "mgda": False, "alpha": 0.3},
            {"lr": 0.01, "steps": 30, "mgda": False, "alpha": 0.3},
        ),  # fmt: skip
        (
            {"lr": 0.01, "steps": 30, "proj_space": "u", "svd_epsilon": 0.8},
            {"lr": 0.01, "steps": 30, "space": "u", "eps": 0.8},
        ),  # fmt: skip
        ({"lr": 0.01, "steps": 30, "proj_space": "v"}, {"lr": 0.01, "steps": 30, "space": "v"}),
    ],
)
def test_dop_equals_fusionbench_loop_in_float64(params: dict, ref: dict) -> None:
    """Closed-form gradients, one pass per step and task-vector coordinates give FusionBench's
    autograd loop on absolute weights to float64 rounding, over three folds."""
    base, cks = models(3)
    proj = projected(base)
    want = fb_dop(base, cks, proj, **(DOP_DEFAULTS | ref))
    got, info = fold_in_memory("dop", base, cks, params, F64)
    assert info.scale == 1.0
    for k in base:
        if base[k].is_floating_point():
            assert rel(got[k] - base[k], want[k] - base[k]) < 1e-9, k
    # The optimisation moved the projected matrices away from the plain average.
    avg = fold_in_memory("dop", base, cks, params | {"steps": 0}, F64)[0]
    assert all(rel(got[k], avg[k]) > 1e-6 for k in proj)


def test_dop_helpers_follow_the_reference_rules() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum ratio 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, e) for e in (0.0, 0.4, 0.5, 0.9, 0.95, 1.0)] == [0, 0, 1, 2, 3, 3]
    assert split_rank(torch.zeros(3), 0.5) == 0
    assert min_norm_weight(1.0, 2.0, 3.0) == 0.999 and min_norm_weight(3.0, 2.0, 1.0) == 0.001
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    gamma = min_norm_weight(float(g1 @ g1), float(g1 @ g2), float(g2 @ g2))
    grid = torch.linspace(0, 1, 10001)
    norms = ((grid[:, None] * g1 + (1 - grid[:, None]) * g2) ** 2).sum(1)
    assert gamma == pytest.approx(float(grid[norms.argmin()]), abs=1e-4)


def test_dop_with_a_zero_task_vector_stays_finite_and_is_deterministic() -> None:
    base, cks = models(2)
    zero = dict(base)  # a checkpoint identical to the base: τ = 0, an empty subspace
    got, _ = fold_in_memory("dop", base, [cks[0], zero], {"lr": 0.01, "steps": 20})
    again, _ = fold_in_memory("dop", base, [cks[0], zero], {"lr": 0.01, "steps": 20})
    for k, v in got.items():
        assert torch.isfinite(v.double()).all(), k
        assert torch.equal(v, again[k]), k


# ---- NUFILT: the authors' FilterLoRA, written here with autograd ----


def authors_nufilt_weight(w_base, w0, w_task, p, a0):
    """``FilterLoRA`` + ``solve_lora`` + ``merge_to_base`` for one layer (their loss, term by term)."""
    tv, prev = w_task - w0, w_base - w0
    pre_v = torch.linalg.svd(prev, full_matrices=False)[2].T[:, : p["null_r"]]
    task_v = torch.linalg.svd(tv, full_matrices=False)[2].T[:, : p["grad_r"]]
    u = pre_v
    a = torch.nn.Parameter(a0.clone())
    b = torch.nn.Parameter(torch.zeros(a0.shape[1], a0.shape[0], dtype=a0.dtype))
    opt = torch.optim.Adam([a, b], lr=p["lr"])
    for _ in range(p["steps"]):
        loss = 0
        for v, target in ((task_v, tv @ task_v), (pre_v, prev @ pre_v)):
            p_v = v - u @ (u.T @ v)
            r = target - (prev @ v + tv @ p_v) - tv @ (b @ (a @ v))
            loss = loss + (r * r).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        gate = torch.eye(a0.shape[1], dtype=a0.dtype) - u @ u.T + b @ a
        return tv @ gate + w_base


NU = {"lora_r": 3, "null_r": 3, "grad_r": 2, "lr": 0.01, "steps": 25, "seed": 7}


def a_start(key: str, p: dict) -> torch.Tensor:
    """A's random start as mergeflow seeds it (N(0, 0.02²), from the seed and the name)."""
    g = torch.Generator().manual_seed(p["seed"] * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(p["lora_r"], 8 if key.endswith("fc.weight") else 12, generator=g) * 0.02


@pytest.mark.parametrize("others", ["base", "average"])
def test_nufilt_equals_the_authors_update_in_float64(others: str) -> None:
    """Three folds: step 1 keeps τ₁ on selected matrices; then the authors' filtered update and
    learned correction (same start for A); other tensors follow ``others``."""
    base, cks = models(3)
    proj = projected(base)
    got, info = fold_in_memory("nufilt", base, cks, NU | {"others": others}, F64)
    assert info.scale == 1.0
    merged = {k: cks[0][k] if k in proj else base[k] for k in base}
    for ck in cks[1:]:
        merged = {
            k: authors_nufilt_weight(merged[k], base[k], ck[k], NU, a_start(k, NU).double())
            if k in proj
            else merged[k]
            for k in base
        }
    for k in base:
        if k in proj:
            assert rel(got[k] - base[k], merged[k] - base[k]) < 1e-9, k
        elif base[k].is_floating_point():
            want = base[k] if others == "base" else sum(c[k] for c in cks) / 3
            assert torch.allclose(got[k], want, atol=1e-12), k


def test_nufilt_filter_keeps_the_new_update_out_of_the_merge_directions() -> None:
    """Without the correction the new update is T P: orthogonal to the merge's top inputs."""
    base, cks = models(2)
    p = {"lora_r": 0, "null_r": 2}
    first, _ = fold_in_memory("nufilt", base, cks[:1], p, F64)
    both, _ = fold_in_memory("nufilt", base, cks, p, F64)
    for k in projected(base):
        prev = first[k] - base[k]
        v = torch.linalg.svd(prev)[2][:2].T
        update = both[k] - first[k]
        assert float((update @ v).norm()) < 1e-10 * float(update.norm()), k
        assert float(update.norm()) > 0.1 * float((cks[1][k] - base[k]).norm()), k


def test_nufilt_include_narrows_the_selected_matrices() -> None:
    base, cks = models(2)
    got, _ = fold_in_memory("nufilt", base, cks, {"include": ["fc"], "steps": 5}, F64)
    assert torch.equal(got["layers.0.out.weight"], base["layers.0.out.weight"])
    assert not torch.equal(got["layers.0.fc.weight"], base["layers.0.fc.weight"])


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("dop", {"alpha": 1.5}, "alpha"),
        ("dop", {"proj_space": "w"}, "proj_space"),
        ("dop", {"svd_epsilon": -0.1}, "svd_epsilon"),
        ("nufilt", {"others": "sum"}, "others"),
        ("nufilt", {"lora_r": -1}, "lora_r"),
        ("nufilt", {"rank": 4}, "rank"),
    ],
)
def test_bad_parameters_are_refused_by_name(method: str, params: dict, message: str) -> None:
    br = DictReader(tiny_state(0), "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    with pytest.raises(ConfigError, match=f"invalid parameters for method '{method}'.*{message}"):
        engine.new_state(method, params, BaseRef(uri="b", digest="d"), rule)


# ---- through the CLI: a folder, an S3 prefix, a LoRA adapter ----


@pytest.mark.parametrize("method", ["dop", "nufilt"])
def test_merge_with_dop_and_nufilt_on_a_folder(cli: Any, model_files: Any, tmp_path: Path, method: str) -> None:  # fmt: skip
    base, cks = model_files(3)
    out = tmp_path / "out"
    r = cli("merge", "--base", base, "--method", method, "--param", "steps=5", "--out", out, *cks)
    assert r.returncode == 0, r.stderr
    merged = load_file(str(out / "model.safetensors"))
    ref, _ = fold_in_memory(method, load_file(str(base)), [load_file(str(c)) for c in cks], {"steps": 5})  # fmt: skip
    for k, v in ref.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k


@pytest.mark.services
@pytest.mark.parametrize("method", ["dop", "nufilt"])
def test_merge_with_dop_and_nufilt_from_an_s3_prefix(cli: Any, s3_bucket: Any, tmp_path: Path, method: str) -> None:  # fmt: skip
    base = tiny_state(0)
    cks = [finetune(base, i) for i in range(2)]
    client = s3_bucket.client()
    for name, t in [("base", base), *((f"ck{i}", c) for i, c in enumerate(cks))]:
        f = tmp_path / f"{name}.safetensors"
        save_file(t, str(f))
        client.upload_file(str(f), s3_bucket.bucket, f"{s3_bucket.prefix}/{name}/model.safetensors")
    out = tmp_path / "out"
    r = cli("merge", "--base", f"{s3_bucket.uri}/base", "--method", method, "--param", "steps=5",
            "--out", out, f"{s3_bucket.uri}/ck0", f"{s3_bucket.uri}/ck1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ref, _ = fold_in_memory(method, base, cks, {"steps": 5})
    merged = load_file(str(out / "model.safetensors"))
    for k, v in ref.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k
