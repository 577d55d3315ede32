"""Calibration splits and the calibration objective, against float64 losses computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.evaluation.calibration import CalibrationObjective, build_objective
from mergeflow.evaluation.spec import EvaluationSuite, TaskSpec

# --- the split in the spec ---------------------------------------------------------------


def test_calibration_uri_from_a_template_or_a_mapping() -> None:
    assert TaskSpec(name="t", data="d/{split}.npz").calibration_uri() == "d/calibration.npz"
    both = {"validation": "v.npz", "test": "t.npz"}
    assert TaskSpec(name="t", data=both).calibration_uri() is None
    with_cal = TaskSpec(name="t", data={**both, "calibration": "c.npz"})
    assert with_cal.calibration_uri() == "c.npz"
    assert with_cal.data_uri("validation") == "v.npz" and with_cal.data_uri("test") == "t.npz"
    with pytest.raises(ValueError, match="split must be one of"):
        with_cal.data_uri("calibration")  # type: ignore[arg-type]  # evaluation never reads it


def test_data_mapping_refuses_unknown_keys_and_still_needs_both_splits() -> None:
    with pytest.raises(
        ValidationError,
        match=r"data mapping has unknown keys \['train'\]: allowed are 'validation', 'test' and 'calibration'",
    ):
        TaskSpec(name="t", data={"validation": "v", "test": "t", "train": "x"})
    with pytest.raises(ValidationError, match=r"data mapping lacks \['test'\]"):
        TaskSpec(name="t", data={"validation": "v", "calibration": "c"})
    with pytest.raises(ValidationError, match="Input should be a valid string"):
        TaskSpec.model_validate({"name": "t", "data": {"validation": "v", "test": 1}})


# --- a tiny mlp whose losses are computed by hand ------------------------------------------
CONFIG = {"mergeflow_architecture": "mlp", "in_features": 4, "hidden": [3], "num_labels": 2}


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def merged(grad: bool = True) -> dict[str, torch.Tensor]:
    """The merged model's float tensors (leaves that require grad unless ``grad`` is false)."""
    return {
        "layers.0.weight": _rand(1, 3, 4).requires_grad_(grad),
        "layers.0.bias": _rand(2, 3).requires_grad_(grad),
    }


HEADS = {
    "ck-a": {"classifier.weight": _rand(3, 2, 3), "classifier.bias": _rand(4, 2)},
    # 3 labels although the config says 2: each task's head keeps its own shape
    "ck-b": {"classifier.weight": _rand(5, 3, 3), "classifier.bias": _rand(6, 3)},
}
RNG = np.random.default_rng(7)
X_A = RNG.normal(size=(10, 4)).astype(np.float32)
Y_A = RNG.integers(0, 2, size=10)
X_B = RNG.normal(size=(7, 4)).astype(np.float32)
Y_B = RNG.integers(0, 3, size=7)


def write(folder: Path, name: str, **arrays: np.ndarray) -> str:
    """A task's data as a template; only its calibration file is written."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    np.savez(folder / name / "calibration.npz", **arrays)
    return str(folder / name / "{split}.npz")


def suite(*tasks: TaskSpec) -> EvaluationSuite:
    return EvaluationSuite(tasks=tasks)


@pytest.fixture
def two_tasks(tmp_path: Path) -> EvaluationSuite:
    return suite(
        TaskSpec(name="a", checkpoint="ck-a", data=write(tmp_path, "a", x=X_A, labels=Y_A)),
        TaskSpec(name="b", checkpoint="ck-b", data=write(tmp_path, "b", x=X_B, y=Y_B)),
    )


def logits64(tensors: dict[str, torch.Tensor], head: dict[str, torch.Tensor], x: np.ndarray):
    """float64 logits of the mlp (relu) by hand."""
    w0, b0 = (tensors[k].detach().double().numpy() for k in ("layers.0.weight", "layers.0.bias"))
    wc, bc = (head[k].double().numpy() for k in ("classifier.weight", "classifier.bias"))
    h = np.maximum(x.astype(np.float64) @ w0.T + b0, 0.0)
    return h @ wc.T + bc


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cross_entropy64(z: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax64(z)[np.arange(len(y)), y].mean())


def entropy64(z: np.ndarray) -> float:
    lp = log_softmax64(z)
    return float(-(np.exp(lp) * lp).sum(-1).mean())


def rows(n: int, step: int, batch: int, seed: int) -> np.ndarray:
    """The documented minibatch rule: a fixed permutation, cycled."""
    b = min(batch, n)
    return np.random.default_rng(seed).permutation(n)[(step * b + np.arange(b)) % n]


def test_value_is_the_mean_of_per_task_cross_entropies(two_tasks: EvaluationSuite) -> None:
    obj = build_objective(two_tasks, CONFIG, HEADS, ["ck-a", "ck-b"], batch_size=4, seed=3)
    assert isinstance(obj, CalibrationObjective)
    assert obj.tasks == ("a", "b")
    assert obj.losses == {"a": "cross_entropy", "b": "cross_entropy"}
    t = merged()
    for step in (0, 3):  # step 3 wraps around task b's 7 rows (positions 12..15 mod 7)
        ra, rb = rows(10, step, 4, 3), rows(7, step, 4, 3)
        assert np.array_equal(obj.batch_indices("a", step), ra)
        assert np.array_equal(obj.batch_indices("b", step), rb)
        want = 0.5 * (
            cross_entropy64(logits64(t, HEADS["ck-a"], X_A[ra]), Y_A[ra])
            + cross_entropy64(logits64(t, HEADS["ck-b"], X_B[rb]), Y_B[rb])
        )
        got = obj(t, step)
        assert got.ndim == 0 and got.requires_grad
        assert float(got.detach()) == pytest.approx(want, rel=1e-5)


def test_gradients_reach_the_tensors(two_tasks: EvaluationSuite) -> None:
    obj = build_objective(two_tasks, CONFIG, HEADS, ["ck-a", "ck-b"], batch_size=4)
    t = merged()
    obj(t, 0).backward()
    for k, v in t.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k
    # a float64 merge (another dtype than the module's) is cast differentiably
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    obj(t64, 0).backward()
    assert t64["layers.0.weight"].grad is not None
    assert t64["layers.0.weight"].grad.dtype == torch.float64


def test_heads_of_different_widths_in_one_objective(two_tasks: EvaluationSuite) -> None:
    """Heads of 2 and 3 labels: the joint objective is the mean of each task's alone."""
    both = build_objective(two_tasks, CONFIG, HEADS, ["ck-a", "ck-b"], batch_size=4)
    only_a = build_objective(two_tasks, CONFIG, HEADS, ["ck-a"], batch_size=4)
    only_b = build_objective(suite(two_tasks.tasks[1]), CONFIG, HEADS, ["ck-b"], batch_size=4)
    assert only_a.tasks == ("a",) and only_b.tasks == ("b",)
    t = merged(grad=False)
    for step in range(3):  # later calls reuse the module whose head was replaced last
        want = 0.5 * (float(only_a(t, step)) + float(only_b(t, step)))
        assert float(both(t, step)) == pytest.approx(want, rel=1e-6)


def test_batches_are_deterministic_for_a_seed(two_tasks: EvaluationSuite) -> None:
    def make(seed: int) -> CalibrationObjective:
        return build_objective(two_tasks, CONFIG, HEADS, ["ck-a", "ck-b"], batch_size=4, seed=seed)

    one, same, other = make(0), make(0), make(1)
    t = merged(grad=False)
    for step in range(5):
        assert np.array_equal(one.batch_indices("a", step), same.batch_indices("a", step))
        assert float(one(t, step)) == float(same(t, step))
    assert any(
        not np.array_equal(one.batch_indices("a", s), other.batch_indices("a", s)) for s in range(3)
    )
    assert float(one(t, 0)) != float(other(t, 0))
    # an epoch (ceil-free: steps of 4 over 10 rows) visits every row; batches never exceed n
    seen = np.concatenate([one.batch_indices("a", s) for s in range(5)])
    assert set(seen.tolist()) == set(range(10))
    big = build_objective(two_tasks, CONFIG, HEADS, ["ck-b"], batch_size=32)
    assert sorted(big.batch_indices("b", 0).tolist()) == list(range(7))


def test_max_examples_caps_each_task(two_tasks: EvaluationSuite) -> None:
    obj = build_objective(two_tasks, CONFIG, HEADS, ["ck-a"], batch_size=4, max_examples=5)
    assert set(np.concatenate([obj.batch_indices("a", s) for s in range(4)]).tolist()) == set(
        range(5)
    )


def test_entropy_objective_on_unlabelled_data(tmp_path: Path) -> None:
    s = suite(TaskSpec(name="u", checkpoint="ck-b", data=write(tmp_path, "u", x=X_B)))
    obj = build_objective(s, CONFIG, HEADS, ["ck-b"], batch_size=3, seed=5)
    assert obj.losses == {"u": "entropy"}
    t = merged(grad=False)
    r = rows(7, 2, 3, 5)
    assert float(obj(t, 2)) == pytest.approx(
        entropy64(logits64(t, HEADS["ck-b"], X_B[r])), rel=1e-5
    )
    # loss="entropy" ignores labels that are there
    labelled = suite(
        TaskSpec(name="a", checkpoint="ck-a", data=write(tmp_path, "a", x=X_A, labels=Y_A))
    )
    ent = build_objective(labelled, CONFIG, HEADS, ["ck-a"], batch_size=4, loss="entropy")
    assert ent.losses == {"a": "entropy"}
    r = rows(10, 1, 4, 0)
    assert float(ent(t, 1)) == pytest.approx(
        entropy64(logits64(t, HEADS["ck-a"], X_A[r])), rel=1e-5
    )


# --- refusals ------------------------------------------------------------------------------
def test_missing_calibration_data(tmp_path: Path) -> None:
    mapping = suite(
        TaskSpec(name="m", checkpoint="ck-a", data={"validation": "v.npz", "test": "t.npz"})
    )
    with pytest.raises(
        ConfigError,
        match=r"task 'm' has no calibration data: its data mapping names no 'calibration' split",
    ):
        build_objective(mapping, CONFIG, HEADS, ["ck-a"])
    absent = suite(TaskSpec(name="n", checkpoint="ck-a", data=str(tmp_path / "n-{split}.npz")))
    with pytest.raises(
        ConfigError,
        match=r"task 'n' has no calibration data: evaluation data .*n-calibration.npz' does not exist",
    ):
        build_objective(absent, CONFIG, HEADS, ["ck-a"])


def test_only_accuracy_tasks(tmp_path: Path) -> None:
    s = suite(
        TaskSpec(name="a", checkpoint="ck-a", data=write(tmp_path, "a", x=X_A, labels=Y_A)),
        TaskSpec(name="q", checkpoint="ck-b", data="qa_{split}", metric="lm_eval"),
    )
    assert build_objective(s, CONFIG, HEADS, ["ck-a"]).tasks == ("a",)  # q not folded yet
    with pytest.raises(
        ConfigError,
        match=r"task 'q' \(metric lm_eval\) has no calibration objective; only accuracy",
    ):
        build_objective(s, CONFIG, HEADS, ["ck-a", "ck-b"])


def test_cross_entropy_needs_labels(tmp_path: Path) -> None:
    s = suite(TaskSpec(name="u", checkpoint="ck-a", data=write(tmp_path, "u", x=X_A)))
    with pytest.raises(
        ConfigError,
        match=r"task 'u': calibration data .* has no labels \('labels' or 'y'\), so it has no cross-entropy",
    ):
        build_objective(s, CONFIG, HEADS, ["ck-a"], loss="cross_entropy")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": X_A[:0], "labels": Y_A[:0]}, r"task 't': calibration data .* has no examples"),
        ({"x": X_A[:5], "labels": Y_A}, r"'labels' has 10 rows but 'x' has 5"),
        ({"labels": Y_A, "z": X_A}, r"has no inputs: expected 'x' or one of"),
        ({"x": X_A, "labels": X_A[:, 0]}, r"labels must be a 1-D integer array"),
    ],
)
def test_bad_calibration_files(tmp_path: Path, arrays: dict, message: str) -> None:
    s = suite(TaskSpec(name="t", checkpoint="ck-a", data=write(tmp_path, "t", **arrays)))
    with pytest.raises(ConfigError, match=message):
        build_objective(s, CONFIG, HEADS, ["ck-a"])


def test_data_that_does_not_fit_the_model(tmp_path: Path) -> None:
    wide = np.ones((6, 5), np.float32)
    s = suite(
        TaskSpec(name="w", checkpoint="ck-a", data=write(tmp_path, "w", x=wide, labels=Y_A[:6]))
    )
    obj = build_objective(s, CONFIG, HEADS, ["ck-a"])  # the width shows only in the forward
    with pytest.raises(
        ConfigError, match=r"task 'w': calibration data .* does not fit the model: "
    ) as e:
        obj(merged(), 0)
    assert isinstance(e.value.__cause__, RuntimeError)
    bad_labels = suite(
        TaskSpec(name="l", checkpoint="ck-a", data=write(tmp_path, "l", x=X_B, labels=Y_B + 1))
    )
    with pytest.raises(ConfigError, match=r"has labels in \[\d, 3\] but its head gives 2 classes"):
        build_objective(bad_labels, CONFIG, HEADS, ["ck-a"], batch_size=7)(merged(), 0)


def test_a_missing_head_and_unknown_tensors(two_tasks: EvaluationSuite) -> None:
    with pytest.raises(
        ConfigError, match=r"scored after folding \['ck-x'\]: nothing to calibrate on"
    ):
        build_objective(two_tasks, CONFIG, HEADS, ["ck-x"])
    with pytest.raises(
        ConfigError, match=r"head of checkpoint 'ck-b', which is not among the heads"
    ):
        build_objective(two_tasks, CONFIG, {"ck-a": HEADS["ck-a"]}, ["ck-a", "ck-b"])
    obj = build_objective(two_tasks, CONFIG, HEADS, ["ck-a"])
    with pytest.raises(ConfigError, match=r"head tensors \['classifier.bias'"):
        obj({**merged(), "classifier.bias": torch.zeros(2)}, 0)
