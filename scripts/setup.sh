#!/usr/bin/env bash
# Create .venv and install mergeflow with the given extra (default: pipeline).
# torch is pinned first: pip then takes the CPU build 2.13.0 from local disk instead of
# pulling several GB of CUDA wheels for a bare `torch` requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-pipeline}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extra}]"
