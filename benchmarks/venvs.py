"""Separate virtual environments for the peers the benchmarks compare against."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TORCH_PIN = "torch==2.13.0"  # first, so pip takes the local CPU build instead of CUDA wheels


def python_of(venv_dir: Path) -> Path:
    """The interpreter of a venv."""
    return venv_dir / "bin" / "python"


def ensure_venv(venv_dir: Path, probe: str, packages: list[str]) -> Path:
    """Create ``venv_dir`` with torch then ``packages``, unless ``python -c probe`` already works there."""
    py = python_of(venv_dir)
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        print(f"reusing {venv_dir.name}")
        return py
    print(f"creating {venv_dir.name} (a minute or two)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv_dir)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, TORCH_PIN, *packages], check=True)
    return py
