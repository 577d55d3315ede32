#!/usr/bin/env bash
# Install everything the tests need, then lint, check the layer contracts and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
.venv/bin/ruff check mergeflow tests benchmarks
.venv/bin/ruff format --check mergeflow tests benchmarks
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
