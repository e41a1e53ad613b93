#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh, idempotent), lint, run every test,
# the end-to-end ones included (they start real vLLM and training-server processes).
# Arguments (test paths, -k ...) run just those, in one process; APOLLO_TEST_WORKERS=0 runs
# everything in one process.
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
# The default model (and its drift reference and guard) once, before any test process needs it.
.venv/bin/python -m server.default_model >/dev/null
pytest=(.venv/bin/python -m pytest -ra --durations=20)
workers=${APOLLO_TEST_WORKERS:-2}
if [ $# -gt 0 ] || [ "$workers" = 0 ]; then  # the tests asked for, in one process
  exec "${pytest[@]}" "$@"
fi
# The in-process tests in $workers processes (one OpenMP thread each: 13 -> 9.5 min on 2
# cores), then the end-to-end ones and those marked serial one at a time: each starts vLLM
# (and a training server or gloo ranks), and two such at once overload a 2-core machine.
rc=0
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${pytest[@]}" -m "not e2e and not serial" \
  -n "$workers" --dist loadfile || rc=$?
"${pytest[@]}" -m "e2e or serial" || rc=$?
exit "$rc"
