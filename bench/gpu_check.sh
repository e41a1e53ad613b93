#!/usr/bin/env bash
# GPU check kit: one run (< 10 min) on a single-GPU machine with torch, transformers and
# safetensors (no vLLM, no network): a stand-in owner holds a model in vLLM's fused layout on
# the GPU and exports it through hooks/export.py; the trainer attaches, maps, trains in place
# with the project's optimizer and trainer; the owner checks it sees every update; then a
# checkpoint sync from GPU memory and the optimizer benchmark. Prints a table last.
#
# Its last step, bench/cotrain.py, measures co-training side by side on Llama-3-8B shapes
# (as many of its 32 layers as the AdamW baseline fits in): torch AdamW on a separate trainer
# copy plus the weight sync into the served tensors, against APOLLO-Mini in place (standard
# and layer-wise); peak memory above the served weights and time per step, then the cost of
# the learn-then-stop check, the server's own step and the null-space guard. Its owner builds
# the served weights on the GPU (nothing saved); its tables go to LOGDIR/cotrain.md.
#
#   bench/gpu_check.sh LOGDIR            # on the GPU
#   bench/gpu_check.sh LOGDIR --dry-run  # the same path on the CPU, small (CI runs this);
#                                        # checks it cannot perform there say "n/a"
# The interpreter: $PYTHON if set, else the checkout's .venv, else python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
USAGE="usage: bench/gpu_check.sh LOGDIR [--dry-run]"
LOGDIR=${1:?$USAGE}
case "${2:-}" in
  "") DEVICE=cuda ;;
  --dry-run) DEVICE=cpu ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
mkdir -p "$LOGDIR"
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bench.gpu_check --device "$DEVICE" --logdir "$LOGDIR" 2>&1 \
  | tee "$LOGDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
