#!/usr/bin/env bash
# Install the pipeline and run the demo on the embedded stack (Prefect + MLflow + SeaweedFS S3).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh demo
exec .venv/bin/mergeflow demo "$@"
