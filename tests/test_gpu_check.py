"""benchmarks/gpu_check.py in its reduced mode (tiny shapes, cpu): the same functions the GPU
run uses, so the script cannot rot while no GPU is lent. About 10-15 s on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mergeflow.merging.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _rows(table: str) -> dict[tuple[str, str], list[str]]:
    """(part, case) -> the other cells of each row of the markdown table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("part", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_reduced_mode_has_a_row_for_every_method(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    env = {k: v for k, v in os.environ.items() if k != "MERGEFLOW_FOLD_WORKERS"}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--reduced", "--out", str(out), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert out.exists()
    table = out.read_text()
    assert "# GPU check (reduced mode)" in table
    assert table.strip() in r.stdout  # printed as well as written
    rows = _rows(table)

    for m in METHODS:  # a method added to the registry shows up here, run or skipped
        assert ("agreement", m.name) in rows, f"no agreement row for {m.name}"
        result, _, _, note = rows[("agreement", m.name)]
        runs = (
            m.kind != "pool"
            and not getattr(m, "statistics", ())
            and not getattr(m, "needs_objective", False)
        )
        if runs:  # a number, not a skip or an error
            assert float(result) < 1.0, (m.name, result, note)
        else:
            assert "skipped" in note, (m.name, note)

    folds = [k for k in rows if k[0] == "folds" and not k[1].endswith("inputs")]
    assert len(folds) == 4  # task_arithmetic and opcm, ViT and Llama shapes
    for k in folds:
        per_fold = rows[k][0].split(" / ")
        assert len(per_fold) == 2 and all(float(s) >= 0 for s in per_fold), (k, rows[k])
    (latency,) = [v for k, v in rows.items() if k[0] == "latency"]
    assert latency[0].endswith(")") and "fold" in latency[0], latency
    for part in ("agreement", "folds", "latency", "total"):
        assert float(rows[("time", part)][1]) >= 0
