"""Tier 1: OPCM math on tiny tensors against a float64 full-SVD reference written here."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import finetune, fold_in_memory, tiny_state

from mergeflow.errors import ConfigError
from mergeflow.merging import engine, linalg
from mergeflow.merging.linalg import (
    GRAM_MAX_CONDITION,
    RITZ_SHARE,
    numerical_rank,
    project,
    split_rank,
    thin_svd_by_gram,
)
from mergeflow.merging.projection import by_name_rules
from mergeflow.merging.state import BaseRef, FoldOptions
from mergeflow.merging.tensors import DictReader


def ref_project_full(x: torch.Tensor, m: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's form: P = Uᵀ X V with full U, V; zero diag(P) and P[:r, :r]; return U P Vᵀ.

    Directions of M's null space (σ_i ≤ max(m, n)·ε·σ_max) keep their diagonal entry: any
    orthonormal completion is a valid SVD there, so only this rule makes the result unique.
    """
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=True)
    r = int(((s.cumsum(0) / s.sum()) > alpha).to(torch.int8).argmax())
    k = int((s > max(m.shape) * torch.finfo(torch.float64).eps * s[0]).sum())
    p = u.T @ x.double() @ vh.T
    p.diagonal()[:k] = 0
    p[: min(r, k), : min(r, k)] = 0
    return u @ p @ vh


def spectrum(shape: tuple[int, int], sigma: list[float], seed: int) -> torch.Tensor:
    """A float64 matrix with exactly these singular values (random orthonormal U, V)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def ref_opcm(base, ckpts, alpha, projected):
    """Float64 OPCM as in docs/design.md §3: first checkpoint initialises, then project, add, rescale."""
    b = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    taus = [{k: c[k].double() - b[k] for k in b} for c in ckpts]
    merged = {k: b[k] + taus[0][k] for k in b}
    lam = 1.0
    norms = [math.sqrt(sum(float((t**2).sum()) for t in taus[0].values()))]
    for tau in taus[1:]:
        norms.append(math.sqrt(sum(float((t**2).sum()) for t in tau.values())))
        mu = sum(norms) / len(norms)
        s = {}
        for k in b:
            m = merged[k] - b[k]
            x = tau[k]
            if k in projected and bool(m.any()):
                x = ref_project_full(x, m, alpha)
            s[k] = lam * m + x
        n = math.sqrt(sum(float((v**2).sum()) for v in s.values()))
        merged = {k: b[k] + s[k] * (mu / n) for k in b}
        lam = n / mu
    return merged


def run_engine(base, ckpts, params=None, options=None, dtype=None):
    return fold_in_memory("opcm", base, ckpts, params, options, dtype)


@pytest.mark.parametrize("decomposition", ["auto", "svd64"])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (40, 3), (3, 40)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_projection_matches_full_svd(shape, alpha, decomposition):
    g = torch.Generator().manual_seed(hash((shape, alpha)) % 2**31)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = project(x, m, alpha, decomposition)
    ref = ref_project_full(x, m, alpha)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0), (ours - ref).abs().max()


@pytest.mark.parametrize("decomposition", ["auto", "svd64"])
def test_projection_with_separated_small_singular_values_matches_full_svd(decomposition):
    g = torch.Generator().manual_seed(3)
    m = torch.randn(9, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 6, generator=g, dtype=torch.float64
    )
    m += 1e-3 * torch.randn(9, 6, generator=g, dtype=torch.float64)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    ours = project(x, m, 0.5, decomposition)
    assert torch.allclose(ours, ref_project_full(x, m, 0.5), atol=1e-9)


@pytest.mark.parametrize("shape", [(60, 24), (24, 60)])
@pytest.mark.parametrize("decomposition", ["auto", "svd64"])
def test_exactly_rank_deficient_update_removes_no_diagonal_term_in_its_null_space(
    shape, decomposition
):
    m = spectrum(shape, [5.0, 3.0, 2.0, 1.0], seed=1)  # rank 4 of 24
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert numerical_rank(torch.linalg.svdvals(m), shape) == 4
    ours = project(x, m, 0.5, decomposition)
    assert torch.allclose(ours, ref_project_full(x, m, 0.5), atol=1e-10)


@pytest.mark.parametrize("shape", [(80, 30), (30, 80)])
def test_clustered_singular_values_are_resolved_exactly(shape):
    """Clusters 1e-6 apart: the float64 Gram path matches the float64 SVD; float32 cannot."""
    sigma = [3.0, 3.0 - 1e-6, 3.0 - 2e-6] + [1.0 + 1e-6 * i for i in range(27, 0, -1)]
    m = spectrum(shape, sigma, seed=4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = ref_project_full(x, m, 0.3)
    err = float((project(x, m, 0.3, "auto") - ref).norm() / x.norm())
    err32 = float((project(x, m, 0.3, "svd32") - ref).norm() / x.norm())
    assert err < 1e-7, err
    assert err32 > 100 * err  # the research code's float32 SVD mixes the clustered vectors


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)])
def test_ill_conditioned_update_falls_back_to_the_float64_svd(shape):
    # well separated, condition 1e9 > GRAM_MAX_CONDITION (exact ties would make OPCM ambiguous)
    sigma = [1.0 - 0.05 * i for i in range(10)] + [1e-3 * (1 - 0.1 * i) for i in range(5)]
    sigma += [1e-9 * (1 - 0.1 * i) for i in range(5)]
    assert 1e9 > GRAM_MAX_CONDITION
    m = spectrum(shape, sigma, seed=6)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = project(x, m, 0.5, "auto")
    assert torch.equal(ours, project(x, m, 0.5, "svd64"))
    # singular vectors of σ ≈ 1e-9 with 1e-10 gaps are themselves only defined to ε·σ_max/gap
    # ≈ 2e-6, so two float64 SVD routes (thin on the tall side, full) agree only that far
    assert torch.allclose(ours, ref_project_full(x, m, 0.5), atol=1e-5)


@pytest.mark.parametrize("shape", [(60, 60), (90, 60)])
def test_a_square_noise_like_tail_is_resolved_without_the_svd_fallback(shape):
    """One σ five decades down, as a square task vector's noise gives (σ_max/σ_min = 5e5 >
    the Gram limit of the first engine): the tail's SVD resolves it, no full SVD needed."""
    sigma = [1.0, 0.6] + [0.02 * (1 - i / 60) for i in range(57)] + [2e-6]
    m = spectrum(shape, sigma, seed=8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    svd = thin_svd_by_gram(m, torch.float64)
    assert svd is not None and svd[1].numel() == 60
    assert torch.allclose(svd[1], torch.linalg.svdvals(m), rtol=1e-9, atol=0)
    ref = ref_project_full(x, m, 0.5)
    # the head's Gram vectors are exact to ε·σ_max²/(σ_i·gap_i) (~3e-10 at σ = 1.3e-3, gaps
    # 3e-4); rounding M to float32, as the state is stored, moves the result by 1e-6 to 3e-4
    assert float((project(x, m, 0.5, "auto") - ref).abs().max()) < 1e-8


def test_clustered_tail_singular_values_are_resolved_by_the_tail_svd(monkeypatch):
    """Tiny σ_i 1e-3 apart (relative): √λ_i of the Gram matrix cannot tell them apart (its
    eigenvalues are exact to ε·σ_max² = 2e-16, they differ by 1e-14), the tail's SVD can."""
    shape = (70, 40)
    sigma = [2.0 - 0.04 * i for i in range(30)] + [3e-5 * (1 - 1e-3 * i) for i in range(10)]
    m = spectrum(shape, sigma, seed=10)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ref = ref_project_full(x, m, 0.5)
    assert 3e-5 < RITZ_SHARE * 2.0 and 2.0 / 2.7e-5 < GRAM_MAX_CONDITION
    err = float((project(x, m, 0.5, "auto") - ref).norm() / x.norm())
    monkeypatch.setattr(linalg, "RITZ_SHARE", 0.0)  # the Gram path alone, as before
    err_gram = float((project(x, m, 0.5, "auto") - ref).norm() / x.norm())
    assert err < 1e-8, err
    assert err_gram > 1000 * err, (err_gram, err)


@pytest.mark.parametrize("shape", [(60, 24), (24, 60)])
def test_a_low_rank_update_keeps_the_gram_path_with_its_exact_rank(shape):
    """A rank-4 update (a LoRA adapter's first fold): the null directions' √λ ≈ √ε·σ_max
    would count as kept and force the full SVD; the tail's SVD puts them at ε level."""
    m = spectrum(shape, [5.0, 3.0, 2.0, 1.0], seed=12)
    tall = m if shape[0] >= shape[1] else m.mT
    svd = thin_svd_by_gram(tall, torch.float32)
    assert svd is not None
    u, s, v = svd
    assert s.numel() == 4 and u.shape == (max(shape), 4) and u.dtype == torch.float32
    assert torch.allclose(s, torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(u.double() * s @ v.mT, tall, atol=1e-6)


def test_projection_keeps_the_input_dtype():
    x, m = torch.randn(6, 4), torch.randn(6, 4)
    assert project(x, m, 0.5).dtype == torch.float32
    assert project(x.bfloat16(), m.bfloat16(), 0.5).dtype == torch.bfloat16


def test_split_rank_is_first_index_over_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # shares .4 .7 .9 1.0
    assert [split_rank(s, a) for a in (0.0, 0.39, 0.4, 0.5, 0.7, 0.95)] == [0, 0, 1, 1, 2, 3]


def test_zero_previous_update_skips_projection():
    x = torch.randn(4, 3)
    assert torch.equal(project(x, torch.zeros(4, 3), 0.5), x)


@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_streaming_opcm_matches_float64_reference(compute):
    base = tiny_state(0)
    ckpts = [finetune(base, i) for i in range(5)]
    params = {"alpha": 0.5}
    ours, info = run_engine(base, ckpts, params, FoldOptions(compute_dtype=compute), dtype=compute)
    br = DictReader(base)
    projected = set(by_name_rules({k: br.meta(k) for k in br.keys()}).projected)
    assert projected == {
        "layers.0.fc.weight",
        "layers.0.out.weight",
        "layers.1.fc.weight",
        "layers.1.out.weight",
    }
    ref = ref_opcm(base, ckpts, 0.5, projected)
    tol = 1e-10 if compute == "float64" else 1e-4
    for k, r in ref.items():
        err = float((ours[k].double() - r).norm() / (r - base[k].double()).norm())
        assert err < tol, (k, err)
    assert torch.equal(ours["position_ids"], base["position_ids"])
    assert info.step == 5 and math.isclose(
        info.scalars["unscaled_norm"] * info.scale, info.scalars["mean_tv_norm"], rel_tol=1e-12
    )


def test_frozen_layer_with_zero_update_is_not_projected_and_stays_finite():
    base = tiny_state(0)
    ckpts = [finetune(base, i) for i in range(3)]
    ckpts[0]["layers.1.out.weight"] = base[
        "layers.1.out.weight"
    ].clone()  # frozen in the first fine-tune
    ours, _ = run_engine(
        base,
        ckpts,
        {"decomposition": "svd64"},
        FoldOptions(compute_dtype="float64"),
        dtype="float64",
    )
    assert all(bool(torch.isfinite(v).all()) for v in ours.values())
    br = DictReader(base)
    ref = ref_opcm(
        base, ckpts, 0.5, set(by_name_rules({k: br.meta(k) for k in br.keys()}).projected)
    )
    assert torch.allclose(
        ours["layers.1.out.weight"].double(), ref["layers.1.out.weight"], atol=1e-10
    )


def test_all_zero_task_vectors_give_the_base_not_nan():
    base = tiny_state(0)
    ours, info = run_engine(base, [dict(base), dict(base), dict(base)])
    assert info.scale == 1.0
    for k in base:
        assert torch.equal(ours[k], base[k])


@pytest.mark.parametrize("alpha", [1.0, 1.5, -0.1])
def test_alpha_outside_unit_interval_is_refused(alpha):
    br = DictReader(tiny_state(0))
    with pytest.raises(ConfigError, match="alpha"):
        engine.new_state(
            "opcm",
            {"alpha": alpha},
            BaseRef(uri="b", digest="d"),
            by_name_rules({k: br.meta(k) for k in br.keys()}),
        )


def test_bf16_inputs_are_upcast_and_output_follows_base_dtype():
    base = tiny_state(0, torch.bfloat16)
    ckpts = [finetune(base, i) for i in range(3)]
    ours, _ = run_engine(base, ckpts)
    assert ours["layers.0.fc.weight"].dtype == torch.bfloat16
    ref32, _ = run_engine(
        {k: (v.float() if v.is_floating_point() else v) for k, v in base.items()},
        [{k: (v.float() if v.is_floating_point() else v) for k, v in c.items()} for c in ckpts],
    )
    for k in ref32:
        if ref32[k].is_floating_point():
            assert torch.allclose(ours[k].float(), ref32[k].bfloat16().float(), atol=0, rtol=0), k
