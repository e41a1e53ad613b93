#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh, idempotent), lint, run every test,
# the end-to-end ones included (they start real vLLM and training-server processes).
# Test files run in APOLLO_TEST_WORKERS processes (default 2, pytest-xdist; 0: one process):
# vLLM start-ups are mostly single-threaded imports, so two files at once use both cores.
# One OpenMP thread per process: two workers with two threads each would oversubscribe.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -ra --durations=20 -n "${APOLLO_TEST_WORKERS:-2}" \
  --dist loadfile "$@"
