#!/usr/bin/env bash
# Create .venv and install mergeflow with the given extra (default: pipeline).
# torch is pinned first: pip then takes the CPU build 2.13.0 from local disk instead of
# pulling several GB of CUDA wheels for a bare `torch` requirement.
# Quiet: pip's output goes to .venv/install.log; on failure its tail is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-pipeline}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
log=.venv/install.log
: >"$log"
echo "installing mergeflow[${extra}] into .venv (log: ${log})" >&2

pip_install() {
  echo "+ pip install $*" >>"$log"
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
    echo "setup: 'pip install $*' failed; last lines of ${log}:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install -e ".[${extra}]"
