#!/usr/bin/env bash
# The llama.cpp environment for `qwen-vllm bench llamacpp` only (not needed to
# serve): llama-cpp-python's server, built from source by pip (about 11 minutes
# on 2 cores), and gguf-py to write GGUF files. Kept apart from .venv: its
# server pins its own FastAPI/pydantic stack.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
PYTHON=${PYTHON:-python3}
packages="llama-cpp-python[server]==0.3.36 gguf==0.19.0"
want=$packages
# LLAMACPP_ISA=avx2: llama.cpp for AVX2 only, whatever this CPU has (the llama.cpp
# side of `qwen-vllm bench llamacpp --cpu-isa avx2`; `make setup-llamacpp-avx2`
# puts it in .venv-llamacpp-avx2).
avx2_only="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if [ "${LLAMACPP_ISA:-}" = avx2 ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} $avx2_only -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
-DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    want="$want (AVX2 only)"
# On CPUs with AMX, llama.cpp 0.3.36's AMX kernels crash on Q8_0/Q4_0 models (a
# general protection fault in libggml-cpu.so, seen at the first request): build
# for this CPU's AVX-512 instead, without AMX. Other CPUs: llama.cpp's native build.
elif grep -qw amx_int8 /proc/cpuinfo; then
    flags=$(grep -m1 '^flags' /proc/cpuinfo)
    on() { grep -qw "$1" <<<"$flags" && echo ON || echo OFF; }
    export CMAKE_ARGS="${CMAKE_ARGS:-} $avx2_only \
-DGGML_AVX512=$(on avx512f) -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni) \
-DGGML_AVX512_BF16=$(on avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    want="$want (no AMX)"
fi
stamp=$VENV/.qwen-vllm-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup-llamacpp: $VENV is up to date"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-cache-dir --force-reinstall: never a wheel built earlier with other flags
# shellcheck disable=SC2086
"$VENV/bin/pip" install --progress-bar off --no-cache-dir --force-reinstall $packages
echo "$want" > "$stamp"
echo "setup-llamacpp: done ($VENV)"
