#!/usr/bin/env bash
# Install everything the tests need, then lint, check the layer contracts and run the suite.
# The same checks run before commits: .pre-commit-config.yaml.
# All tiers (unit, services, slow); plain `pytest` runs only the unit tier. Arguments go to
# pytest; a -m of yours replaces the tier selection.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
.venv/bin/ruff check mergeflow tests benchmarks scripts
.venv/bin/ruff format --check mergeflow tests benchmarks scripts
.venv/bin/lint-imports
.venv/bin/mypy
exec .venv/bin/python -m pytest -m "unit or services or slow" "$@"
