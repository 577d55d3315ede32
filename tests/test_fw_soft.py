"""FW-Soft (``fw_soft``): the math against a float64 reference written here (its own oracle,
its own Adam), the task-wise oracle, the minibatches it reads, determinism, divergence refused
with nothing written, the CLI, ``mergeflow methods``, a pool state, and the objective's views."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_pool_methods import F64, _mlp_files, model

from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.merging.methods.fw_soft import pick_per_task
from mergeflow.merging.pool import pool_merge
from mergeflow.merging.tensors import DictReader, DictWriter

Tensors = Mapping[str, torch.Tensor]


class Targets:
    """Mean over its tasks of Σ_k ‖θ_k − T_{j,k}(step)‖², one target per loss and task, shifted
    by 0.01·(step mod 3) so that the minibatch (step) each call reads matters. ``narrow`` gives
    views as :class:`~mergeflow.evaluation.calibration.CalibrationObjective` does; every call
    is recorded as ``(tasks, loss, batch_size, step)``."""

    def __init__(
        self,
        targets: Mapping[str, Mapping[str, Tensors]],
        tasks: Sequence[str] | None = None,
        loss: str = "cross_entropy",
        batch_size: int = 100,
        calls: list | None = None,
    ) -> None:
        self.targets = targets
        self.tasks = tuple(targets["cross_entropy"] if tasks is None else tasks)
        self.loss, self.batch_size = loss, batch_size
        self.calls = [] if calls is None else calls

    def narrow(self, tasks=None, *, loss=None, batch_size=None) -> Targets:
        return Targets(
            self.targets,
            self.tasks if tasks is None else tasks,
            loss or self.loss,
            batch_size or self.batch_size,
            self.calls,
        )

    def target(self, loss: str, task: str, step: int) -> dict[str, torch.Tensor]:
        return {k: v + 0.01 * (step % 3) for k, v in self.targets[loss][task].items()}

    def __call__(self, tensors: Tensors, step: int) -> torch.Tensor:
        self.calls.append((self.tasks, self.loss, self.batch_size, step))
        per_task = []
        for j in self.tasks:
            t = self.target(self.loss, j, step)
            per_task.append(sum(((tensors[k] - t[k]) ** 2).sum() for k in tensors))
        return sum(per_task) / len(per_task)


def _combine(theta, d, lam) -> dict[str, torch.Tensor]:
    """θ_k + Σ_i λ_{i,k} d_{i,k} (tensor k is column k of λ)."""
    return {k: theta[k] + sum(lam[i, c] * d[i][k] for i in range(len(d)))
            for c, k in enumerate(theta)}  # fmt: skip


def fw_soft_reference(base, cks, obj: Targets, *, iters=10, ada_iters=500, lr=1e-3, init=0.3,
                      coeff=1e-8, ada_loss="entropy"):  # fmt: skip
    """FW-Soft as the authors' FusionBench code runs it, on whole models in float64: the
    gradient of each task's loss picks a checkpoint (not one picked before in the iteration),
    then Adam (written out) learns one coefficient per picked checkpoint and tensor."""
    keys = list(base)
    theta = {k: base[k].clone() for k in keys}
    picks = []
    for t in range(iters):
        picked: list[int] = []
        for j in obj.tasks:
            if len(picked) == len(cks):
                break
            target = obj.target("cross_entropy", j, t)
            g = {k: 2 * (theta[k] - target[k]) for k in keys}
            cos = [sum(float(g[k].flatten() @ c[k].flatten() / (g[k].norm() * c[k].norm()))
                       for k in keys) for c in cks]  # fmt: skip
            picked.append(min((i for i in range(len(cks)) if i not in picked), key=cos.__getitem__))
        picks.append(picked)
        d = [{k: cks[i][k] - theta[k] for k in keys} for i in picked]
        lam = torch.full((len(d), len(keys)), init if t == 0 else coeff, dtype=torch.float64)
        m, v = torch.zeros_like(lam), torch.zeros_like(lam)
        for s in range(ada_iters):
            x = _combine(theta, d, lam)
            ts = [obj.target(ada_loss, j, t * ada_iters + s) for j in obj.tasks]
            dx = {k: sum(2 * (x[k] - tj[k]) for tj in ts) / len(ts) for k in keys}
            grad = torch.tensor([[float((dx[k] * d[i][k]).sum()) for k in keys]
                                 for i in range(len(d))], dtype=torch.float64)  # fmt: skip
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            lam = lam - lr * (m / (1 - 0.9 ** (s + 1))) / (
                (v / (1 - 0.999 ** (s + 1))).sqrt() + 1e-8
            )
        theta = _combine(theta, d, lam)
    return theta, picks


def _setting(n_tasks: int, n_cks: int):
    base = model(0)
    cks = [model(i, base) for i in range(1, n_cks + 1)]
    names = ["a", "b", "c"][:n_tasks]

    def mix(w: Sequence[float]) -> dict[str, torch.Tensor]:
        return {
            k: base[k] + sum(wi * (c[k] - base[k]) for wi, c in zip(w, cks, strict=True))
            for k in base
        }

    ce = {j: mix([0.9 if i == (2 * n) % n_cks else 0.1 for i in range(n_cks)])
          for n, j in enumerate(names)}  # fmt: skip
    ent = {j: mix([0.5 if i in (n % n_cks, (n + 1) % n_cks) else 0.0 for i in range(n_cks)])
           for n, j in enumerate(names)}  # fmt: skip
    return base, cks, {"cross_entropy": ce, "entropy": ent}


@pytest.mark.parametrize(
    ("n_tasks", "n_cks", "params"),
    [
        (2, 4, {"max_iters": 3, "ada_iters": 40, "ada_lr": 0.02, "ada_loss": "entropy"}),
        (
            2,
            3,
            {
                "max_iters": 2,
                "ada_iters": 30,
                "ada_loss": "cross_entropy",
                "ada_init": 0.5,
                "ada_coeff": 0.1,
                "ada_lr": 0.05,
            },
        ),  # fmt: skip
        (
            3,
            2,
            {"max_iters": 3, "ada_iters": 25, "ada_lr": 0.05},
        ),  # the oracle runs out of checkpoints; the default loss (cross-entropy)
    ],
)
def test_fw_soft_equals_the_authors_algorithm_on_known_losses(n_tasks, n_cks, params) -> None:
    base, cks, targets = _setting(n_tasks, n_cks)
    out, lines = DictWriter(), []
    obj = Targets(targets)
    pool_merge("fw_soft", params, DictReader(base, "base"),
               [DictReader(c, f"c{i}") for i, c in enumerate(cks)], out, obj, options=F64,
               log=lines.append, names=[f"c{i}" for i in range(n_cks)])  # fmt: skip
    want, picks = fw_soft_reference(
        base,
        cks,
        Targets(targets),
        iters=params["max_iters"],
        ada_iters=params["ada_iters"],
        lr=params["ada_lr"],
        init=params.get("ada_init", 0.3),
        coeff=params.get("ada_coeff", 1e-8),
        ada_loss=params.get("ada_loss", "cross_entropy"),
    )
    for k in base:
        assert torch.allclose(out.tensors[k], want[k], rtol=0, atol=1e-10), k
    assert len(lines) == params["max_iters"]
    for line, picked in zip(lines, picks, strict=True):  # the log names each task's pick
        assert ", ".join(f"{'abc'[j]}: c{i}" for j, i in enumerate(picked)) in line, line
    assert all(len(p) == min(n_tasks, n_cks) for p in picks)
    # it reads: per iteration t each task's cross-entropy alone (minibatch t of `examples`),
    # then the coefficients' loss over every task, minibatches t·ada_iters + s of 16
    tasks, ada = obj.tasks, params["ada_iters"]
    want_calls = []
    for t in range(params["max_iters"]):
        want_calls += [((j,), "cross_entropy", 100, t) for j in tasks]
        loss = params.get("ada_loss", "cross_entropy")
        want_calls += [(tasks, loss, 16, t * ada + s) for s in range(ada)]
    assert obj.calls == want_calls


def test_the_task_wise_oracle_picks_per_task_without_repeats() -> None:
    scores = [[0.5, -1.0, 0.0], [-2.0, -3.0, 0.0], [1.0, 0.0, 0.0]]  # scores[checkpoint][task]
    assert pick_per_task(scores, 3) == [1, 0, 2]  # task b's best (1) is taken: its next is 0
    assert pick_per_task(scores[:2], 3) == [1, 0]  # stops when every checkpoint is picked
    assert pick_per_task([[0.0], [0.0]], 1) == [0]  # ties: the first in pool order


def test_fw_soft_objective_options_come_from_its_parameters() -> None:
    from mergeflow.merging.methods import get_pool, validate_params
    from mergeflow.merging.methods.base import ObjectiveOptions

    fw = get_pool("fw_soft")
    assert fw.objective_options(validate_params(fw, {"examples": 7, "seed": 3})) == (
        ObjectiveOptions(batch_size=7, seed=3, loss="cross_entropy")
    )


class NanGrad(torch.autograd.Function):
    """A finite value (0) whose gradient is NaN."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0.0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, math.nan, dtype=g.dtype)


class Broken(Targets):
    """Targets whose loss ``where`` ("cross_entropy" or "entropy") breaks as ``how`` says."""

    how = where = ""

    def narrow(self, tasks=None, *, loss=None, batch_size=None) -> Targets:
        view = Broken(self.targets, self.tasks if tasks is None else tasks, loss or self.loss)
        view.how, view.where = self.how, self.where
        return view

    def __call__(self, tensors: Tensors, step: int) -> torch.Tensor:
        value = super().__call__(tensors, step)
        if self.loss != self.where:
            return value
        if self.how == "loss":
            return value * math.nan
        return value + sum(NanGrad.apply(t) for t in tensors.values())


@pytest.mark.parametrize(
    ("where", "how", "message"),
    [
        ("cross_entropy", "loss", "loss became nan at iteration 1 \\(task 'a'\\)"),
        ("cross_entropy", "gradient", "gradient of 'a.weight' became non-finite at iteration 1"),
        ("entropy", "loss", "loss became nan at iteration 1, Adam step 1; lower ada_lr"),
        ("entropy", "gradient", "coefficients became non-finite at iteration 1, Adam step 1"),
    ],
)
def test_a_diverging_fw_soft_writes_nothing(where: str, how: str, message: str) -> None:
    base, cks, targets = _setting(2, 3)
    obj = Broken(targets)
    obj.how, obj.where = how, where
    out = DictWriter()
    with pytest.raises(CheckpointError, match=f"{message}.*nothing was written"):
        pool_merge("fw_soft", {"max_iters": 2, "ada_iters": 3, "ada_loss": "entropy"}, DictReader(base),
                   [DictReader(c) for c in cks], out, obj, log=None)  # fmt: skip
    assert not out.committed and out.tensors == {}


def test_fw_soft_refuses_an_objective_without_views() -> None:
    from test_pool_methods import Quadratic

    base = model(0)
    with pytest.raises(TypeError, match="one loss per task"):
        pool_merge("fw_soft", {}, DictReader(base), [DictReader(model(1, base))], DictWriter(),
                   Quadratic(base), log=None)  # fmt: skip


def test_cli_merge_with_fw_soft_is_deterministic_for_a_seed(cli, tmp_path) -> None:
    bd, cks, suite = _mlp_files(tmp_path)

    def merge(out: str, *params: str):
        args = [a for p in ("max_iters=2", "ada_iters=4", "ada_lr=0.05", *params)
                for a in ("--param", p)]  # fmt: skip
        r = cli("merge", "--base", bd, "--method", "fw_soft", "--calibration", suite, *args,
                "--out", tmp_path / out, *cks)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r, load_file(str(tmp_path / out / "model.safetensors"))

    r, one = merge("one")
    base = load_file(str(bd / "model.safetensors"))
    assert set(one) == set(base) and all(bool(torch.isfinite(v).all()) for v in one.values())
    assert any(not torch.equal(one[k], base[k]) for k in one)
    assert "iteration 1/2: loss" in r.stderr and "chose t0: " in r.stderr and ", t1: " in r.stderr
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mergeflow.method"] == "fw_soft"
    assert json.loads(meta["mergeflow.params"])["ada_iters"] == 4
    _, again = merge("again")
    assert all(torch.equal(one[k], again[k]) for k in one)
    _, other = merge("other", "seed=1")
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_methods_lists_fw_soft_with_its_parameters(cli) -> None:
    r = cli("methods", "--json")
    assert r.returncode == 0, r.stderr
    row = {m["name"]: m for m in json.loads(r.stdout)}["fw_soft"]
    assert row["kind"] == "pool"
    assert {p["name"]: p["default"] for p in row["params"]} == {
        "max_iters": 10,
        "examples": 100,
        "ada_iters": 500,
        "ada_lr": 1e-3,
        "ada_batch_size": 16,
        "ada_loss": "cross_entropy",
        "ada_init": 0.3,
        "ada_coeff": 1e-8,
        "seed": 0,
    }


def test_a_pool_state_of_fw_soft_exports_its_pool_merge(tmp_path: Path) -> None:
    """A lineage's pool merge (``lineage rebuild --method fw_soft``) is `merge`'s, bit for bit."""
    from test_pool_lineage import _backbone, _members

    from mergeflow.architecture import resolve_projection, resolve_vocab
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef
    from mergeflow.storage import states
    from mergeflow.storage.objects import LocalStore
    from mergeflow.storage.pools import merge_pool_into
    from mergeflow.storage.schemes import open_checkpoint

    bd, cks, _ = _mlp_files(tmp_path)
    base = open_checkpoint(str(bd))
    params = {"max_iters": 2, "ada_iters": 3}
    info = engine.new_state("fw_soft", params, BaseRef(uri=base.uri, digest=base.digest()),
                            resolve_projection(base.reader, base.config),
                            vocab=resolve_vocab(base.reader, base.config))  # fmt: skip
    init = LocalStore(tmp_path / "init")
    states.init_state(init, info)
    opened = [open_checkpoint(str(c), base=base.reader) for c in cks]
    b = _backbone(base)
    obj = Targets({loss: {"t": {k: v + s for k, v in b.items()}}
                   for loss, s in (("cross_entropy", 0.05), ("entropy", -0.02))})  # fmt: skip
    one = LocalStore(tmp_path / "one")
    m = merge_pool_into(init, one, base, _members(opened), obj, params=params)
    assert (m.info.method, m.info.step, m.info.scale) == ("fw_soft", 2, 1.0)
    exported, direct = DictWriter(), DictWriter()
    states.export_state(one, base.reader, exported)
    pool_merge("fw_soft", params, base.reader, [o.reader for o in opened], direct, obj, log=None)
    assert sorted(exported.tensors) == sorted(direct.tensors) == sorted(b)
    for k, v in direct.tensors.items():
        assert torch.equal(exported.tensors[k], v), k


def test_a_calibration_objective_narrows_to_tasks_losses_and_batches(tmp_path: Path) -> None:
    from mergeflow.cli.pool import read_suite
    from mergeflow.evaluation.calibration import build_objective

    bd, cks, suite_path = _mlp_files(tmp_path)
    suite = read_suite(str(suite_path))
    config = json.loads((bd / "config.json").read_text())
    base = load_file(str(bd / "model.safetensors"))
    heads = {}
    for c in cks:
        ck = load_file(str(c / "model.safetensors"))
        heads[c.name] = {k: v for k, v in ck.items() if k not in base}
    obj = build_objective(suite, config, heads, ("ck0", "ck1"), batch_size=8, seed=0)
    whole = float(obj(base, 1))
    a, b = obj.narrow(["t0"]), obj.narrow(["t1"])
    assert a.tasks == ("t0",) and a.losses == {"t0": "cross_entropy"}
    assert math.isclose(whole, (float(a(base, 1)) + float(b(base, 1))) / 2, rel_tol=1e-6)
    ent = obj.narrow(loss="entropy", batch_size=5)
    assert ent.losses == {"t0": "entropy", "t1": "entropy"} and len(ent.batch_indices("t0", 0)) == 5
    assert list(ent.batch_indices("t0", 0)) == list(obj.batch_indices("t0", 0)[:5])  # same order
    assert float(ent(base, 0)) != float(obj.narrow(batch_size=5)(base, 0))
    with pytest.raises(ConfigError, match="no task 'nope'"):
        obj.narrow(["nope"])
    unlabelled = obj.narrow(loss="entropy")
    with pytest.raises(ConfigError, match="has no labels"):
        unlabelled.narrow(loss="cross_entropy")
