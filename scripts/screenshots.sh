#!/usr/bin/env bash
# README screenshots of a lineage in the MLflow UI: Debian Chromium driven by Playwright,
# both installed here on first use (.venv-docs). Usage: see scripts/screenshots.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  apt-get install -y chromium >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
fi
if [ ! -x .venv-docs/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-docs
  .venv-docs/bin/python -m pip install --disable-pip-version-check -q "playwright>=1.40,<2"
fi
exec .venv-docs/bin/python scripts/screenshots.py "$@"
