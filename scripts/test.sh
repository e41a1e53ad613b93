#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh, idempotent), lint, run every test,
# the end-to-end ones included (they start real vLLM and training-server processes).
# APOLLO_TEST_WORKERS=2 runs two test files at once (pytest-xdist, one OpenMP thread per
# process): ~18 instead of ~25 min on 2 cores, but two vLLM start-ups at once can overload
# such a machine (torch's shared-memory manager timed out once): the default is one process.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
workers=${APOLLO_TEST_WORKERS:-0}
if [ "$workers" != 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  set -- -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -ra --durations=20 "$@"
