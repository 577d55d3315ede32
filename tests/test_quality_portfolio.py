"""benchmarks/quality.py's portfolio row: the pick per fold by validation, and its refusal."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quality"] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("quality", None)
        sys.path.remove(str(REPO / "benchmarks"))


def _result(matrix: list[dict[str, float]], validation: list[float]) -> dict:
    return {"matrices": [matrix], "validation_acc": [validation], "fold_seconds": [1.0]}


def test_each_fold_registers_the_candidate_best_on_validation(quality) -> None:
    """Fold 1: b validates better, fold 2: a; on a tie the first listed wins. The row's test
    matrix is the winners' rows, not the best test scores."""
    order = ["t1", "t2"]
    results = {
        "a": _result([{"t1": 0.5}, {"t1": 0.9, "t2": 0.8}], [0.4, 0.9]),
        "b": _result([{"t1": 0.6}, {"t1": 0.1, "t2": 0.2}], [0.7, 0.3]),
        "c": _result([{"t1": 0.99}, {"t1": 0.99, "t2": 0.99}], [0.7, 0.0]),
    }
    row = quality.portfolio_row(results, [order], {"t1": 1.0, "t2": 1.0}, ["a", "b", "c"])
    assert row["winners"] == [["b", "a"]]
    assert row["acc"] == [pytest.approx(0.85)] and row["bwt"] == [pytest.approx(0.3)]
    assert row["fold_seconds"] == [3.0]


def test_a_candidate_without_validation_scores_is_refused_by_name(quality) -> None:
    results = {"a": _result([{"t1": 0.5}], [0.4]), "b": {"matrices": [[{"t1": 0.5}]]}}
    with pytest.raises(
        ValueError, match=r"no validation scores for b, c; run them first \(--methods b,c\)"
    ):
        quality.portfolio_row(results, [["t1"]], {"t1": 1.0}, ["a", "b", "c"])


def test_a_calibration_size_below_one_is_refused_before_anything_is_built(
    quality, tmp_path, capsys
) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    with pytest.raises(SystemExit) as e:
        quality.main(["--calibration", "0", "--out", str(out), "--work", str(work)])
    assert e.value.code == 2
    assert "--calibration: at least 1 example per task, got 0" in capsys.readouterr().err
    assert not out.exists() and not work.exists()
