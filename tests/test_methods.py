"""Tier 1: every method on a tiny model against its formula, written independently here."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import finetune, fold_in_memory, tiny_state

from mergeflow.errors import CheckpointError, ConfigError, StateError
from mergeflow.merging import batch as batch_engine
from mergeflow.merging import engine
from mergeflow.merging.methods import (
    get_batch,
    get_continual,
    get_method,
    method_names,
    method_table,
)
from mergeflow.merging.projection import by_name_rules
from mergeflow.merging.sparsify import global_threshold
from mergeflow.merging.state import BaseRef, FoldOptions
from mergeflow.merging.tensors import DictReader, DictWriter

BASE = tiny_state(0)
CKPTS = [finetune(BASE, i) for i in range(4)]
FLOAT = [k for k, v in BASE.items() if v.is_floating_point()]
TAUS = [{k: c[k] - BASE[k] for k in FLOAT} for c in CKPTS]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def fold_all(method, params=None, ckpts=CKPTS):
    return fold_in_memory(method, BASE, ckpts, params)[0]


def batch(method, params=None):
    out = DictWriter()
    batch_engine.batch_merge(
        method, params or {}, DictReader(BASE), [DictReader(c) for c in CKPTS], out
    )
    return out.tensors


def assert_formula(ours, expected):
    for k in FLOAT:
        assert rel(ours[k], expected[k]) <= 1e-4, k
    assert torch.equal(ours["position_ids"], BASE["position_ids"])


def test_continual_task_arithmetic():
    assert_formula(
        fold_all("task_arithmetic"), {k: BASE[k] + 0.3 * sum(t[k] for t in TAUS) for k in FLOAT}
    )
    assert_formula(
        fold_all("task_arithmetic", {"scale": "0.7"}),
        {k: BASE[k] + 0.7 * sum(t[k] for t in TAUS) for k in FLOAT},
    )


def test_continual_weight_average():
    assert_formula(
        fold_all("weight_average"), {k: sum(c[k] for c in CKPTS) / len(CKPTS) for k in FLOAT}
    )


def test_magmax_keeps_largest_magnitude_and_later_wins_ties():
    expected = {}
    for k in FLOAT:
        best = TAUS[0][k].clone()
        for t in TAUS[1:]:
            best = torch.where(t[k].abs() >= best.abs(), t[k], best)
        expected[k] = BASE[k] + 0.5 * best
    assert_formula(fold_all("magmax"), expected)
    tie = [dict(BASE), dict(BASE)]
    tie[0]["layers.0.fc.bias"] = BASE["layers.0.fc.bias"] + 1.0
    tie[1]["layers.0.fc.bias"] = BASE["layers.0.fc.bias"] - 1.0
    out = fold_all("magmax", ckpts=tie)
    assert torch.allclose(out["layers.0.fc.bias"], BASE["layers.0.fc.bias"] - 0.5)


def _trim_ref(t: torch.Tensor, density: float) -> torch.Tensor:
    k = math.ceil(density * t.numel())
    thr = t.abs().reshape(-1).sort(descending=True).values[k - 1]
    return t * (t.abs() >= thr)


def test_continual_ties_without_double_counting():
    expected = {}
    for k in FLOAT:
        run = _trim_ref(TAUS[0][k], 0.2)
        for t in TAUS[1:]:
            new = _trim_ref(t[k], 0.2)
            sign = torch.sign(run + new)
            run = run * ((torch.sign(run) == sign) & (run != 0)) + new * (
                (torch.sign(new) == sign) & (new != 0)
            )
        expected[k] = BASE[k] + 0.5 * run
    assert_formula(fold_all("ties"), expected)


def test_ties_global_trim_uses_exact_global_top_k():
    out = fold_all("ties", {"trim": "global", "density": 0.3}, ckpts=CKPTS[:1])
    allv = torch.cat([TAUS[0][k].reshape(-1) for k in FLOAT])
    kth = allv.abs().sort(descending=True).values[math.ceil(0.3 * allv.numel()) - 1]
    for k in FLOAT:
        assert torch.allclose(
            out[k], BASE[k] + 0.5 * TAUS[0][k] * (TAUS[0][k].abs() >= kth), atol=1e-6
        )


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 1.0])
def test_global_threshold_is_exact(density):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(50, 7, generator=g) * 10 ** (i - 1) for i in range(3)] + [
        torch.full((30,), 0.5)
    ]  # ties too
    thr = global_threshold(lambda: iter([(str(i), t) for i, t in enumerate(ts)]), density)
    allv = torch.cat([t.reshape(-1) for t in ts]).abs()
    assert thr == float(allv.sort(descending=True).values[math.ceil(density * allv.numel()) - 1])


def test_batch_task_arithmetic_and_weight_average():
    assert_formula(
        batch("batch_task_arithmetic"), {k: BASE[k] + 0.3 * sum(t[k] for t in TAUS) for k in FLOAT}
    )
    assert_formula(
        batch("batch_weight_average"), {k: sum(c[k] for c in CKPTS) / len(CKPTS) for k in FLOAT}
    )


BASE16 = tiny_state(0, torch.bfloat16)
CKPTS16 = [finetune(BASE16, i) for i in range(4)]


def _batch16(method: str, ckpts: list[dict[str, torch.Tensor]]) -> DictWriter:
    out = DictWriter()
    batch_engine.batch_merge(
        method,
        {},
        DictReader(BASE16, "base"),
        [DictReader(c, f"ck{i}") for i, c in enumerate(ckpts)],
        out,
    )
    return out


def test_linear_batch_methods_sum_16bit_checkpoints_without_forming_task_vectors(monkeypatch):
    def no_task_vector(*args, **kwargs):
        raise AssertionError("a task vector was formed")

    monkeypatch.setattr(batch_engine, "_task_vector", no_task_vector)
    monkeypatch.setattr(engine, "BLOCK", 7)  # many blocks, a partial last one
    for method, s in [("batch_task_arithmetic", 0.3), ("batch_weight_average", 0.25)]:
        got = _batch16(method, CKPTS16).tensors
        for k in FLOAT:
            b = BASE16[k].double()
            want = b + s * sum(c[k].double() - b for c in CKPTS16)
            assert got[k].dtype == torch.bfloat16
            # within one bfloat16 step of the float64 result, and rounded to nearest almost
            # everywhere (the float32 running sums may tip a tie)
            assert bool(((got[k].double() - want).abs() <= want.abs() * 2**-8 + 1e-30).all()), k
            assert float((got[k] == want.to(torch.bfloat16)).double().mean()) >= 0.99, k


def test_linear_batch_on_16bit_inputs_refuses_nan_and_survives_what_only_its_sum_overflows():
    bad = [dict(c) for c in CKPTS16]
    bad[2]["layers.1.fc.weight"] = bad[2]["layers.1.fc.weight"].clone()
    bad[2]["layers.1.fc.weight"][0, 0] = float("nan")
    out = DictWriter()
    with pytest.raises(
        CheckpointError, match=r"^checkpoint ck2: tensor 'layers.1.fc.weight' contains NaN or Inf"
    ):
        batch_engine.batch_merge(
            "batch_task_arithmetic",
            {},
            DictReader(BASE16, "base"),
            [DictReader(c, f"ck{i}") for i, c in enumerate(bad)],
            out,
        )
    assert not out.committed and out.tensors == {}
    # θ_i = θ₀ = 3e38: Σ θ_i overflows float32, Σ τ_i = 0 does not; the merge is θ₀
    big = {k: (torch.full_like(v, 3e38) if v.is_floating_point() else v) for k, v in BASE16.items()}
    out = DictWriter()
    batch_engine.batch_merge(
        "batch_task_arithmetic", {}, DictReader(big), [DictReader(big) for _ in range(4)], out
    )
    assert all(torch.equal(out.tensors[k], big[k]) for k in big)


def test_batch_ties_disjoint_mean():
    expected = {}
    for k in FLOAT:
        tr = torch.stack([_trim_ref(t[k], 0.2) for t in TAUS])
        sign = torch.sign(tr.sum(0))
        agree = (torch.sign(tr) == sign) & (tr != 0)
        expected[k] = BASE[k] + (tr * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert_formula(batch("batch_ties"), expected)


def test_dare_is_seeded_drops_and_rescales():
    one = DictWriter()
    batch_engine.batch_merge(
        "batch_dare",
        {"drop_rate": 0.5, "scale": 1.0, "seed": 7},
        DictReader(BASE),
        [DictReader(CKPTS[0])],
        one,
    )
    again = DictWriter()
    batch_engine.batch_merge(
        "batch_dare",
        {"drop_rate": 0.5, "scale": 1.0, "seed": 7},
        DictReader(BASE),
        [DictReader(CKPTS[0])],
        again,
    )
    other = DictWriter()
    batch_engine.batch_merge(
        "batch_dare",
        {"drop_rate": 0.5, "scale": 1.0, "seed": 8},
        DictReader(BASE),
        [DictReader(CKPTS[0])],
        other,
    )
    k = "embed.weight"
    d = one.tensors[k] - BASE[k]
    kept = d != 0
    assert torch.equal(one.tensors[k], again.tensors[k]) and not torch.equal(
        one.tensors[k], other.tensors[k]
    )
    assert 0.35 < float(kept.float().mean()) < 0.65
    assert torch.allclose(d[kept], 2 * TAUS[0][k][kept], atol=1e-6)


def test_every_method_listed_with_defaults():
    rows = {r["name"]: r for r in method_table()}
    assert (
        set(rows)
        == set(method_names())
        == {
            "opcm",
            "task_arithmetic",
            "weight_average",
            "magmax",
            "ties",
            "dop",
            "nufilt",
            "adamerging",
            "regmean",
            "fisher",
            "batch_task_arithmetic",
            "batch_ties",
            "batch_dare",
            "batch_weight_average",
            "batch_adamerging",
            "fw_merging",
            "fw_soft",
        }
    )
    assert {p["name"]: p["default"] for p in rows["opcm"]["params"]} == {
        "alpha": 0.5,
        "decomposition": "auto",
    }
    assert {p["name"]: p["default"] for p in rows["magmax"]["params"]} == {"scale": 0.5}
    assert {p["name"]: p["default"] for p in rows["regmean"]["params"]} == {"alpha": 0.9}
    assert {p["name"]: p["default"] for p in rows["dop"]["params"]} == {
        "lr": 1e-4,
        "steps": 200,
        "mgda": True,
        "ema": True,
        "ema_beta": 0.999,
        "alpha": 0.8,
        "svd_epsilon": 0.99999,
        "proj_space": "uv",
    }
    assert {p["name"]: p["default"] for p in rows["nufilt"]["params"]} == {
        "lora_r": 64,
        "null_r": 128,
        "grad_r": 8,
        "null_space": True,
        "lr": 1e-3,
        "steps": 50,
        "seed": 42,
        "include": (),
        "others": "base",
    }
    assert {p["name"]: p["default"] for p in rows["fisher"]["params"]} == {
        "min_fisher": 1e-6,
        "normalize": True,
    }
    assert {p["name"]: p["default"] for p in rows["adamerging"]["params"]} == {
        "steps": 80,
        "lr": 0.01,
        "granularity": "row",
        "loss": "auto",
        "batch_size": 32,
        "seed": 0,
        "update": "task_vector",
        "alpha": 0.5,
    }


def test_unknown_method_and_bad_params_are_refused():
    with pytest.raises(ConfigError, match="unknown method 'nope'; known methods: opcm"):
        get_method("nope")
    br = DictReader(BASE)
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    with pytest.raises(ConfigError, match="invalid parameters for method 'task_arithmetic': bogus"):
        engine.new_state("task_arithmetic", {"bogus": 1}, BaseRef(uri="b", digest="d"), rule)
    with pytest.raises(ConfigError, match="scale"):
        engine.new_state("magmax", {"scale": "abc"}, BaseRef(uri="b", digest="d"), rule)
    with pytest.raises(ConfigError, match="batch method"):
        engine.new_state("batch_ties", {}, BaseRef(uri="b", digest="d"), rule)


def test_folding_the_same_checkpoint_twice_is_refused_and_writes_nothing():
    br = DictReader(BASE)
    info = engine.new_state(
        "opcm", {}, BaseRef(uri="b", digest="d"), by_name_rules({k: br.meta(k) for k in br.keys()})
    )
    w = DictWriter()
    info = engine.fold(info, None, br, DictReader(CKPTS[0]), checkpoint_id="a", digest="x", out=w)
    again = DictWriter()
    with pytest.raises(StateError, match="already folded as step 1"):
        engine.fold(
            info, w.reader(), br, DictReader(CKPTS[0]), checkpoint_id="b", digest="x", out=again
        )
    assert not again.committed and again.tensors == {}


def test_kind_is_an_attribute_and_wrong_kinds_are_refused():
    assert {m: get_method(m).kind for m in ("opcm", "batch_ties")} == {
        "opcm": "continual",
        "batch_ties": "batch",
    }
    assert method_names("batch") == [
        "batch_task_arithmetic",
        "batch_ties",
        "batch_dare",
        "batch_weight_average",
    ]
    assert get_continual("ties").name == "ties" and get_batch("batch_dare").name == "batch_dare"
    with pytest.raises(
        ConfigError,
        match=r"^method 'batch_ties' is a batch method \(a one-shot merge\); folding into a state "
        r"needs a continual method: opcm, task_arithmetic, weight_average, magmax, ties, dop, nufilt, adamerging, regmean, fisher$",
    ):
        get_continual("batch_ties")
    with pytest.raises(ConfigError, match=r"^method 'opcm' is a continual method .* batch_dare"):
        get_batch("opcm")
    with pytest.raises(ConfigError, match="is a continual method"):
        batch_engine.batch_merge("opcm", {}, DictReader(BASE), [DictReader(CKPTS[0])], DictWriter())


def test_scalars_are_typed_per_method_and_validated():
    _, info = fold_in_memory("opcm", BASE, CKPTS[:2])
    assert set(info.scalars) == {"tv_norm_sum", "mean_tv_norm", "last_tv_norm", "unscaled_norm"}
    assert math.isclose(info.scale, info.scalars["mean_tv_norm"] / info.scalars["unscaled_norm"])
    _, info = fold_in_memory("magmax", BASE, CKPTS[:2], {"scale": 0.25})
    assert info.scalars == {} and info.scale == 0.25
    _, info = fold_in_memory("weight_average", BASE, CKPTS[:2])
    assert info.scalars == {} and info.scale == 1.0
    br = DictReader(BASE)
    bad = engine.new_state(
        "opcm", {}, BaseRef(uri="b", digest="d"), by_name_rules({k: br.meta(k) for k in br.keys()})
    ).model_copy(update={"scalars": {"lambda": 1.0}})
    with pytest.raises(StateError, match="the state's scalars do not fit method 'opcm'"):
        engine.fold(
            bad, None, br, DictReader(CKPTS[0]), checkpoint_id="a", digest="x", out=DictWriter()
        )


def test_engine_errors_name_the_option_not_only_a_cli_flag(monkeypatch):
    lacks = {k: v for k, v in CKPTS[0].items() if k != "layers.0.out.weight"}
    with pytest.raises(
        CheckpointError,
        match=r"missing from the checkpoint \('layers.0.out.weight'\); allow missing tensors "
        r"\(CLI --allow-missing, lineage allow_missing: true\) to treat them as zero task vectors$",
    ):
        engine.check_compatible(DictReader(BASE), DictReader(lacks), FoldOptions())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"^device 'cuda' was requested but no CUDA device is available$"
    ):
        engine.resolve_device("cuda")


@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average", "magmax", "opcm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_folds_in_blocks_equal_whole_tensor_folds(monkeypatch, method, dtype):
    """The engine folds elementwise steps block by block on a CPU (OPCM: its unprojected
    tensors); cut into blocks of 7 entries, the states equal the whole-tensor fold's."""
    base = tiny_state(0, dtype)
    ckpts = [finetune(base, i) for i in range(3)]
    monkeypatch.setattr(engine, "BLOCK", 7)
    blocked, info_b = fold_in_memory(method, base, ckpts)
    cls = type(get_continual(method))
    monkeypatch.setattr(cls, "elementwise", lambda self, params, projected: False)
    whole, info_w = fold_in_memory(method, base, ckpts)
    assert all(torch.equal(blocked[k], whole[k]) for k in whole)
    assert info_b.scale == pytest.approx(info_w.scale, rel=1e-12)


def test_a_blocked_fold_names_the_checkpoint_with_nan_and_keeps_the_state():
    base = tiny_state(0, torch.bfloat16)
    good, bad = finetune(base, 0), finetune(base, 1)
    bad["layers.0.norm.weight"] = bad["layers.0.norm.weight"].clone()
    bad["layers.0.norm.weight"][3] = float("inf")
    br = DictReader(base, "base")
    rule = by_name_rules({k: br.meta(k) for k in br.keys()})
    info = engine.new_state("task_arithmetic", {}, BaseRef(uri="b", digest="d"), rule)
    first = DictWriter()
    info = engine.fold(
        info, None, br, DictReader(good, "c0"), checkpoint_id="c0", digest="d0", out=first
    )
    out = DictWriter()
    with pytest.raises(
        CheckpointError, match=r"^checkpoint c1: tensor 'layers.0.norm.weight' contains NaN or Inf"
    ):
        engine.fold(
            info,
            first.reader(),
            br,
            DictReader(bad, "c1"),
            checkpoint_id="c1",
            digest="d1",
            out=out,
        )
    assert not out.committed and info.step == 1
