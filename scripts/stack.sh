#!/usr/bin/env bash
# The FastChat topology in one command (same as `qwen-vllm stack`):
#   scripts/stack.sh --model /path/to/Qwen-7B-Chat [--workers K] [--tensor-parallel-size N] [--web] [-- vLLM flags]
# Ctrl-C stops every process it started.
set -euo pipefail
exec "${PYTHON:-python}" -m qwen_vllm.serving.stack "$@"
