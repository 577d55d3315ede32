#!/usr/bin/env bash
# The long reliability runs of issue 11 (docs/reliability.md): fuzzing, the kill matrix,
# every hostile input through a lineage, exactly-once under load through `mergeflow serve`,
# a crashed served fold, a lock held past its lease, MLflow basic auth, and the load test on
# SQLite and PostgreSQL. They start real servers (Prefect, MLflow, SeaweedFS S3; PostgreSQL
# at 127.0.0.1:5432 for the load test) and take long: about an hour on 2 busy cores.
#
# The `unit or services or slow` tiers (scripts/test.sh, CI) run a short version of each.
# Prints every figure line (RELIABILITY ...) at the end; the full pytest log is kept.
#
# Knobs (environment):
#   MERGEFLOW_FUZZ_EXAMPLES      inputs per fuzz target (default here 20000: a few minutes)
#   MERGEFLOW_KILL_ROUNDS        rounds of the kill matrix (default 1: 7 kills, one per point)
#   MERGEFLOW_BURST              checkpoints in the served burst (default 20)
#   MERGEFLOW_LOAD_LINEAGES / MERGEFLOW_LOAD_CHECKPOINTS   load size (default 10 x 10)
# Arguments go to pytest (e.g. -k fuzz to run one part).
set -euo pipefail
cd "$(dirname "$0")/.."
export MERGEFLOW_FUZZ_EXAMPLES="${MERGEFLOW_FUZZ_EXAMPLES:-20000}"
log="${MERGEFLOW_RELIABILITY_LOG:-reliability.log}"
status=0
# the fuzz targets are short runs in the default tiers; here they run with many more inputs
.venv/bin/python -m pytest -p no:cacheprovider -s -q -m "unit or reliability" \
    tests/test_fuzz.py \
    tests/test_reliability_inputs.py \
    tests/test_reliability_lock.py \
    tests/test_reliability_crash.py \
    tests/test_reliability_once.py \
    tests/test_reliability_security.py \
    tests/test_reliability_load.py \
    "$@" 2>&1 | tee "$log" || status=$?
echo
echo "==================== reliability figures ===================="
grep -a "RELIABILITY" "$log" | sed 's/^.*RELIABILITY /  /' || true
exit "$status"
