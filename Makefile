# qwen-vllm: `make demo` (set up + whole stack on a fixture model) and
# `make test` (set up + the test suite). `make setup` alone is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-llamacpp setup-llamacpp-avx2 test test-gpu demo

setup:
	./scripts/setup.sh

# Only for `qwen-vllm bench llamacpp`: llama-cpp-python in .venv-llamacpp (built by pip).
setup-llamacpp:
	./scripts/setup-llamacpp.sh

setup-llamacpp-avx2:
	LLAMACPP_ISA=avx2 LLAMACPP_VENV=.venv-llamacpp-avx2 ./scripts/setup-llamacpp.sh

test: setup
	$(PY) -m pytest -q -rs --durations=25 $(PYTEST_ARGS)

# The CUDA tests only (docs/gpu.md); they skip, saying why, without a GPU.
test-gpu: setup
	$(PY) -m pytest -q -rs -m gpu tests/gpu

demo: setup
	$(PY) -m qwen_vllm.cli demo
