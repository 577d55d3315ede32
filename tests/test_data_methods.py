"""Data-informed methods (regmean, fisher, adamerging): exact math on tiny tensors against
float64 references, every fold order, and every bad-input path with nothing committed."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest
import torch

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging import engine
from mergeflow.merging.methods.regmean import condition_estimate, reduce_gram, solve_psd
from mergeflow.merging.projection import by_name_rules
from mergeflow.merging.state import BaseRef, FoldOptions
from mergeflow.merging.stats import CheckpointStats, check_stats, stats_metadata
from mergeflow.merging.tensors import DictReader, DictWriter

F64 = FoldOptions(compute_dtype="float64")


def base_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "fc.bias": torch.randn(3, generator=g, dtype=torch.float64),
        "out.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "norm.weight": torch.ones(4, dtype=torch.float64),
    }


def checkpoint(i: int, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}


def gram(i: int, n: int, rank: int | None = None) -> torch.Tensor:
    """The mean x xᵀ of some random inputs (rank-deficient with ``rank``)."""
    g = torch.Generator().manual_seed(200 + i)
    x = torch.randn(rank or 2 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def fisher(i: int, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + i)
    return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) ** 2 for k, v in base.items()}


def stats_of(
    tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], **meta: str
) -> CheckpointStats:
    md = stats_metadata(10, 40, "test") | meta
    return check_stats(DictReader(dict(tensors), "stats"), md, DictReader(dict(base), "base"))


def fold_all(
    method: str,
    params: dict,
    base: dict[str, torch.Tensor],
    cks: list[tuple[str, dict[str, torch.Tensor], CheckpointStats | None]],
    objective=None,
):
    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state(method, params, BaseRef(uri="base", digest="b"), rule, F64)
    state = None
    for cid, ck, st in cks:
        w = DictWriter()
        info = engine.fold(
            info,
            state,
            br,
            DictReader(ck, cid),
            checkpoint_id=cid,
            digest=cid,
            out=w,
            stats=st,
            objective=objective,
        )
        state = w.reader()
    assert state is not None
    return info, state


def regmean_reference(base, cks, grams, alpha: float) -> dict[str, torch.Tensor]:
    """The batch RegMean formula, in float64, on whole weights (as FusionBench writes it)."""
    out = {}
    for k in base:
        if k in grams[0]:
            gs = [reduce_gram(g[k], alpha) for g in grams]
            a = sum(gs)
            rhs = sum(g @ c[k].T for g, c in zip(gs, cks, strict=True))
            out[k] = torch.linalg.solve(a, rhs).T
        else:
            out[k] = sum(c[k] for c in cks) / len(cks)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_continual_regmean_equals_the_batch_formula_in_every_order(alpha: float) -> None:
    base = base_model()
    cks = [checkpoint(i, base) for i in range(3)]
    grams = [{"fc.weight": gram(i, 4), "out.weight": gram(10 + i, 3)} for i in range(3)]
    want = regmean_reference(base, cks, grams, alpha)
    for order in itertools.permutations(range(3)):
        info, state = fold_all(
            "regmean",
            {"alpha": alpha},
            base,
            [
                (f"c{i}", cks[i], stats_of({f"{k}:gram": g for k, g in grams[i].items()}, base))
                for i in order
            ],
        )
        assert info.scale == 1.0
        for k, b in base.items():
            got = b + state.get(k)
            assert torch.allclose(got, want[k], atol=1e-10, rtol=0), (order, k)
        assert set(state.keys()) == set(base) | {
            "fc.weight:A",
            "fc.weight:B",
            "out.weight:A",
            "out.weight:B",
        }


def test_regmean_with_a_singular_gram_keeps_the_base_weight_in_unreached_directions() -> None:
    n = 4
    g = gram(0, n)
    g[:, 2] = 0.0
    g[2, :] = 0.0  # input 2 is never active: A is singular
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(3, n, generator=gen, dtype=torch.float64)
    got = solve_psd(g, g @ tau.T).T
    assert torch.allclose(got[:, 2], torch.zeros(3, dtype=torch.float64), atol=1e-12)
    keep = [0, 1, 3]
    assert torch.allclose(got[:, keep], tau[:, keep], atol=1e-9)
    # an ill-conditioned but definite A goes the same way as its pseudo-inverse
    # (the condition estimate must see it whatever the eigenvectors: 50 random bases)
    for _ in range(50):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        a = q @ torch.diag(torch.tensor([1.0, 1e-3, 1e-14, 1.0], dtype=torch.float64)) @ q.T
        b = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        want = torch.linalg.pinv(a, rtol=1e-12, hermitian=True) @ b
        assert torch.allclose(solve_psd(a, b), want, atol=1e-8)
    # a well-conditioned A keeps the exact Cholesky solve
    a = gram(3, n)
    assert condition_estimate(a, torch.linalg.cholesky(a)) < 1e4
    assert torch.allclose(solve_psd(a, b), torch.linalg.solve(a, b), atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_continual_fisher_equals_the_batch_formula_in_every_order(normalize: bool) -> None:
    base = base_model()
    cks = [checkpoint(i, base) for i in range(3)]
    fs = [fisher(i, base) for i in range(3)]
    fs[1] = {k: v * 50.0 for k, v in fs[1].items()}  # normalisation matters
    del fs[0]["norm.weight"], fs[1]["norm.weight"], fs[2]["norm.weight"]
    eps = 1e-6
    c = [
        1.0 / (float(torch.sqrt(sum((v**2).sum() for v in f.values()))) + eps) if normalize else 1.0
        for f in fs
    ]
    want = {}
    for k in base:
        if k in fs[0]:
            num = sum(ci * (f[k] + eps) * ck[k] for ci, f, ck in zip(c, fs, cks, strict=True))
            den = sum(ci * (f[k] + eps) for ci, f in zip(c, fs, strict=True))
            want[k] = num / den
        else:
            want[k] = sum(ck[k] for ck in cks) / 3
    for order in itertools.permutations(range(3)):
        _, state = fold_all(
            "fisher",
            {"normalize": normalize},
            base,
            [
                (f"c{i}", cks[i], stats_of({f"{k}:fisher": v for k, v in fs[i].items()}, base))
                for i in order
            ],
        )
        for k, b in base.items():
            assert torch.allclose(b + state.get(k), want[k], atol=1e-10, rtol=0), (order, k)


def _regmean_state(base, n: int = 1):
    cks = [checkpoint(i, base) for i in range(n)]
    return fold_all(
        "regmean",
        {},
        base,
        [(f"c{i}", cks[i], stats_of({"fc.weight:gram": gram(i, 4)}, base)) for i in range(n)],
    )


def _refuse(base, info, state, ck, stats, match: str, objective=None) -> None:
    br = DictReader(base, "base")
    w = DictWriter()
    with pytest.raises((CheckpointError, ConfigError), match=match):
        engine.fold(
            info,
            state,
            br,
            DictReader(ck, "bad"),
            checkpoint_id="bad",
            digest="bad",
            out=w,
            stats=stats,
            objective=objective,
        )
    assert not w.committed and w.tensors == {}


def test_regmean_refuses_a_checkpoint_without_statistics_and_commits_nothing() -> None:
    base = base_model()
    info, state = _regmean_state(base)
    _refuse(base, info, state, checkpoint(5, base), None, "carries no mergeflow_stats")
    # a Gram the earlier folds had is missing
    other = stats_of({"out.weight:gram": gram(1, 3)}, base)
    _refuse(base, info, state, checkpoint(5, base), other, "'fc.weight:gram' is missing")
    # a Gram the earlier folds did not have cannot be combined
    extra = stats_of({"fc.weight:gram": gram(1, 4), "out.weight:gram": gram(2, 3)}, base)
    _refuse(base, info, state, checkpoint(5, base), extra, "no counterpart in the state")
    # a Fisher-only file for a Gram method
    fonly = stats_of({"fc.weight:fisher": torch.ones(3, 4, dtype=torch.float64)}, base)
    _refuse(base, info, state, checkpoint(5, base), fonly, "'fc.weight:gram' is missing")


def test_non_finite_or_negative_statistics_are_refused_with_nothing_committed() -> None:
    base = base_model()
    info, state = _regmean_state(base)
    g = gram(3, 4)
    g[0, 1] = float("nan")
    _refuse(
        base, info, state, checkpoint(5, base), stats_of({"fc.weight:gram": g}, base), "NaN or Inf"
    )
    g = gram(3, 4)
    g[2, 2] = -1.0
    _refuse(
        base, info, state, checkpoint(5, base), stats_of({"fc.weight:gram": g}, base), "negative"
    )


@pytest.mark.parametrize(
    ("tensors", "meta", "match"),
    [
        (
            {"fc.weight:gram": gram(0, 5)},
            {},
            r"shape \[5, 5\] .* needs \[4, 4\]; was it made for another base",
        ),
        ({"missing.weight:gram": gram(0, 4)}, {}, "which the base does not have"),
        ({"fc.bias:gram": gram(0, 3)}, {}, "a Gram needs a 2-D"),
        ({"fc.weight:hessian": gram(0, 4)}, {}, "is not named"),
        (
            {"fc.weight:gram": gram(0, 4)},
            {"format": "mergeflow.stats/2"},
            "stats format 'mergeflow.stats/2'",
        ),
        (
            {"fc.weight:gram": gram(0, 4)},
            {"examples": "0"},
            "'examples' must be a positive integer",
        ),
        ({"fc.weight:gram": torch.ones(4, 4, dtype=torch.int64)}, {}, "statistics are floats"),
        ({}, {}, "holds no statistics"),
    ],
)
def test_check_stats_refuses_bad_files(tensors, meta, match) -> None:
    with pytest.raises(CheckpointError, match=match):
        stats_of(tensors, base_model(), **meta)


class Quadratic:
    """A toy objective: ‖θ − target‖² over every tensor (its optimum is known in closed form)."""

    tasks = ("toy",)

    def __init__(self, target: Mapping[str, torch.Tensor], poison_at: int | None = None) -> None:
        self.target = target
        self.poison_at = poison_at

    def __call__(self, tensors: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        loss = sum(((tensors[k] - self.target[k]) ** 2).sum() for k in tensors)
        if self.poison_at is not None and step >= self.poison_at:
            loss = loss * float("nan")
        return loss


def test_adamerging_learns_the_coefficients_of_a_known_optimum() -> None:
    base = base_model()
    cks = [checkpoint(i, base) for i in range(2)]
    taus = [{k: c[k] - base[k] for k in base} for c in cks]
    a_star, b_star = 0.7, 1.3
    target = {k: base[k] + a_star * taus[0][k] + b_star * taus[1][k] for k in base}
    params = {"steps": 400, "lr": 0.05}
    # step 1 learns b alone: θ₀ + b·τ₁ closest to the target
    info, state = fold_all("adamerging", params, base, [("c0", cks[0], None)], Quadratic(target))
    info, state = fold_all(
        "adamerging", params, base, [("c0", cks[0], None), ("c1", cks[1], None)], Quadratic(target)
    )
    # the second fold's (a, b) recover the optimum exactly where M_1 = b₁·τ₁ has b₁ ≠ 0
    for k in base:
        merged = base[k] + state.get(k)
        assert torch.allclose(merged, target[k], atol=2e-3), k
    # deterministic: the same fold twice gives the same bits
    _, again = fold_all(
        "adamerging", params, base, [("c0", cks[0], None), ("c1", cks[1], None)], Quadratic(target)
    )
    assert all(torch.equal(state.get(k), again.get(k)) for k in base)


def test_adamerging_learns_one_pair_per_row_of_each_matrix() -> None:
    """granularity=row (the default): M₂[r] = a_r·M₁[r] + b_r·τ₂[r] for each row r of a
    matrix, one (a, b) for a vector; a target with different pairs per row is reached, and
    one pair per tensor cannot reach it."""
    base = base_model()
    cks = [checkpoint(i, base) for i in range(2)]
    taus = [{k: c[k] - base[k] for k in base} for c in cks]
    first = {k: base[k] + 0.8 * taus[0][k] for k in base}  # fold 1 lands on b₁ = 0.8
    pairs = {
        "fc.weight": (torch.tensor([0.5, 1.1, 0.2]), torch.tensor([1.3, 0.4, 0.9])),
        "out.weight": (torch.tensor([1.4, 0.3]), torch.tensor([-0.2, 0.8])),
        "fc.bias": (0.6, 1.2),
        "norm.weight": (0.9, 0.7),
    }

    def times(c, x):
        return x * c[:, None].to(x.dtype) if isinstance(c, torch.Tensor) else x * c

    target = {
        k: base[k] + times(a, 0.8 * taus[0][k]) + times(b, taus[1][k])
        for k, (a, b) in pairs.items()
    }
    folds = [("c0", cks[0], None), ("c1", cks[1], None)]
    for granularity in ("row", "tensor"):
        params = {"steps": 600, "lr": 0.05, "granularity": granularity}
        _, s1 = fold_all("adamerging", params, base, folds[:1], Quadratic(first))
        assert all(torch.allclose(s1.get(k), 0.8 * taus[0][k], atol=2e-3) for k in base)
        _, s2 = fold_all("adamerging", params, base, folds, Quadratic(target))
        close = {k: torch.allclose(base[k] + s2.get(k), target[k], atol=5e-3) for k in base}
        want = granularity == "row"
        assert close == {
            "fc.weight": want,
            "out.weight": want,
            "fc.bias": True,
            "norm.weight": True,
        }


def test_adamerging_refuses_without_data_and_when_the_loss_diverges() -> None:
    base = base_model()
    ck = checkpoint(0, base)
    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state("adamerging", {}, BaseRef(uri="base", digest="b"), rule, F64)
    _refuse(base, info, None, ck, None, "learns from calibration data, and none was given")
    target = {k: v * 2 for k, v in base.items()}
    _refuse(
        base,
        info,
        None,
        ck,
        None,
        r"the calibration loss became nan at step 3 of 80; lower lr .*nothing was folded",
        objective=Quadratic(target, poison_at=2),
    )


def test_a_non_finite_row_coefficient_from_the_whole_model_step_folds_nothing(monkeypatch) -> None:
    """The plan checks every entry of a whole-model step's tensors, not only its floats."""
    from mergeflow.merging.methods.adamerging import AdaMerging

    base = base_model()
    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state("adamerging", {}, BaseRef(uri="base", digest="b"), rule, F64)
    rows = torch.ones(3, dtype=torch.float64)
    rows[1] = float("inf")
    bad = {"a:fc.weight": torch.ones(3), "b:fc.weight": rows}
    monkeypatch.setattr(AdaMerging, "prepare", lambda self, params, whole: bad)
    target = {k: v * 2 for k, v in base.items()}
    _refuse(
        base,
        info,
        None,
        checkpoint(0, base),
        None,
        "whole-model step gave a non-finite 'b:fc.weight'; nothing was folded",
        objective=Quadratic(target),
    )


def _write_checkpoints(tmp_path, n: int, kind: str = "gram"):
    """A base file and ``n`` checkpoint folders, each with its mergeflow_stats.safetensors."""
    from helpers.models import finetune, tiny_state
    from safetensors.torch import save_file

    base = tiny_state(0)
    bp = tmp_path / "base.safetensors"
    save_file(base, str(bp))
    folders = []
    for i in range(n):
        d = tmp_path / f"ck{i}"
        d.mkdir()
        ck = finetune(base, i)
        save_file(ck, str(d / "model.safetensors"))
        if kind == "gram":
            st = {f"{k}:gram": gram(i, v.shape[1]).float() for k, v in base.items() if v.dim() == 2}
        else:
            st = {
                f"{k}:fisher": fisher(i, {k: v})[k].float()
                for k, v in base.items()
                if v.is_floating_point()
            }
        save_file(st, str(d / "mergeflow_stats.safetensors"), metadata=stats_metadata(8, 32, "t"))
        folders.append(d)
    return bp, folders


@pytest.mark.parametrize(("method", "kind"), [("regmean", "gram"), ("fisher", "fisher")])
def test_cli_merge_reads_stats_and_state_fold_gives_the_same_result(cli, tmp_path, method, kind):
    from safetensors.torch import load_file

    bp, cks = _write_checkpoints(tmp_path, 3, kind)
    one = tmp_path / "one"
    r = cli("merge", "--base", bp, "--method", method, "--out", one, *cks)
    assert r.returncode == 0, r.stderr
    state = tmp_path / "state"
    assert cli("state", "init", "--state", state, "--base", bp, "--method", method).returncode == 0
    for c in cks:  # one checkpoint at a time
        assert cli("state", "fold", "--state", state, c).returncode == 0
    two = tmp_path / "two"
    assert cli("state", "export", "--state", state, "--out", two).returncode == 0
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the result is the formula's (float32 state vs the float64 reference)
    base = load_file(str(bp))
    cks_t = [load_file(str(c / "model.safetensors")) for c in cks]
    sts = [load_file(str(c / "mergeflow_stats.safetensors")) for c in cks]
    if method == "regmean":
        grams = [{k.rsplit(":", 1)[0]: v.double() for k, v in s.items()} for s in sts]
        want = regmean_reference(
            {k: v.double() for k, v in base.items() if v.is_floating_point()},
            [{k: v.double() for k, v in c.items()} for c in cks_t],
            grams,
            0.9,
        )
        for k, w in want.items():
            assert torch.allclose(a[k].double(), w, atol=1e-4), k


def test_cli_refuses_a_checkpoint_without_stats_and_writes_nothing(cli, tmp_path):
    bp, cks = _write_checkpoints(tmp_path, 2)
    (cks[1] / "mergeflow_stats.safetensors").unlink()
    out = tmp_path / "out"
    r = cli("merge", "--base", bp, "--method", "regmean", "--out", out, *cks)
    assert r.returncode == 2
    assert (
        "needs the statistics of every checkpoint" in r.stderr
        and "carries no mergeflow_stats" in r.stderr
    )
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    state = tmp_path / "state"
    cli("state", "init", "--state", state, "--base", bp, "--method", "regmean")
    before = (state / "state.json").read_text()
    r = cli("state", "fold", "--state", state, *cks)
    assert r.returncode == 2 and "carries no mergeflow_stats" in r.stderr
    assert (
        state / "state.json"
    ).read_text() == before  # the first checkpoint was not folded either


def test_statistics_of_the_checkpoints_own_head_are_accepted_and_unused() -> None:
    base = base_model()
    ck = checkpoint(0, base) | {"head.weight": torch.ones(2, 4, dtype=torch.float64)}
    tensors = {"fc.weight:gram": gram(0, 4), "head.weight:fisher": torch.ones(2, 4)}
    md = stats_metadata(4, 4, "t")
    st = check_stats(DictReader(tensors), md, DictReader(base), DictReader(ck))
    assert st.names("gram") == ["fc.weight"] and st.names("fisher") == []
    with pytest.raises(CheckpointError, match="'head.weight', which the base does not have"):
        check_stats(DictReader(tensors), md, DictReader(base))


class Unfit:
    """An objective whose data does not fit the model (as the evaluation reports it)."""

    tasks = ("toy",)

    def __call__(self, tensors, step):
        raise ConfigError(
            "task 'toy': calibration data 'x.npz' does not fit the model: shape mismatch"
        )


def test_calibration_data_that_does_not_fit_refuses_the_checkpoint() -> None:
    base = base_model()
    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state("adamerging", {}, BaseRef(uri="base", digest="b"), rule, F64)
    with pytest.raises(CheckpointError, match="does not fit the model.*nothing was folded"):
        engine.fold(
            info,
            None,
            br,
            DictReader(checkpoint(0, base), "ck"),
            checkpoint_id="ck",
            digest="ck",
            out=(w := DictWriter()),
            objective=Unfit(),
        )
    assert not w.committed


def test_adamerging_projected_learns_coefficients_of_the_opcm_update() -> None:
    """With update=projected, the second fold is θ₀ + a·M₁ + b·X̃₂ for the projected matrices,
    X̃₂ the OPCM projection of τ₂ against M₁ (float64 full-SVD reference from test_opcm_math)."""
    from test_opcm_math import ref_project_full

    base = base_model()
    cks = [checkpoint(i, base) for i in range(2)]
    taus = [{k: c[k] - base[k] for k in base} for c in cks]
    # one pair per tensor: the rerun's first fold must keep M₁'s singular vectors (below)
    params = {
        "steps": 400,
        "lr": 0.05,
        "update": "projected",
        "alpha": 0.5,
        "granularity": "tensor",
    }
    # step 1: b₁ lands on a known optimum, so M₁ = b₁·τ₁ is known to the test
    first = {k: base[k] + 0.9 * taus[0][k] for k in base}
    _, s1 = fold_all("adamerging", params, base, [("c0", cks[0], None)], Quadratic(first))
    m1 = {k: s1.get(k) for k in base}
    assert all(torch.allclose(m1[k], 0.9 * taus[0][k], atol=2e-3) for k in base)
    projected = {"fc.weight", "out.weight"}
    x2 = {
        k: ref_project_full(taus[1][k], m1[k], 0.5) if k in projected else taus[1][k] for k in base
    }
    target = {k: base[k] + 0.6 * m1[k] + 1.4 * x2[k] for k in base}
    _, s2 = fold_all(
        "adamerging", params, base, [("c0", cks[0], None), ("c1", cks[1], None)], Quadratic(target)
    )
    # the rerun's first fold learns another multiple of τ₁; X̃₂ depends only on M₁'s singular
    # vectors, so the target stays reachable with a = 0.6·0.9/b₁
    for k in base:
        assert torch.allclose(base[k] + s2.get(k), target[k], atol=5e-3), k
