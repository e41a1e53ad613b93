#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh, idempotent), lint, run every test,
# the end-to-end ones included (they start real vLLM and training-server processes).
# APOLLO_TEST_WORKERS=2 runs two test files at once (pytest-xdist, one OpenMP thread per
# process): ~18 instead of ~25 min on 2 cores, but two vLLM start-ups at once can overload
# such a machine (torch's shared-memory manager timed out once): the default is one process.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The console's browser test (tests/test_console_e2e.py) drives Debian's Chromium through
# Playwright, which never downloads a browser here: installed when missing (root or sudo).
if ! command -v chromium >/dev/null; then
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  if command -v apt-get >/dev/null && "${sudo[@]}" true 2>/dev/null; then
    echo "test: installing chromium (apt-get)" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
      chromium fonts-dejavu-core >/dev/null
  else
    echo "test: chromium is missing and cannot be installed here (apt-get install chromium):" \
         "the console's browser test will fail" >&2
  fi
fi
.venv/bin/ruff check .
workers=${APOLLO_TEST_WORKERS:-0}
if [ "$workers" != 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  set -- -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -ra --durations=20 "$@"
