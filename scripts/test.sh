#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh, idempotent), lint, run every test,
# the end-to-end ones included (they start real vLLM and training-server processes).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -ra --durations=20 "$@"
