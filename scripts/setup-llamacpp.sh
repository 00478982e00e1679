#!/usr/bin/env bash
# The llama.cpp environment for `qwen-vllm bench llamacpp` only (not needed to
# serve): llama-cpp-python's server, built from source by pip (about 11 minutes
# on 2 cores), and gguf-py to write GGUF files. Kept apart from .venv: its
# server pins its own FastAPI/pydantic stack.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
PYTHON=${PYTHON:-python3}
want="llama-cpp-python[server]==0.3.36 gguf==0.19.0"
stamp=$VENV/.qwen-vllm-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup-llamacpp: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/pip" install --progress-bar off $want
echo "$want" > "$stamp"
echo "setup-llamacpp: done ($VENV)"
