"""Run by Python at start-up in every process of a ``qwen-vllm bench --cpu-isa
avx2`` job (runtime/cpu.py ``avx2_environment`` puts this folder on
PYTHONPATH): the CPU looks AVX2-only before vLLM chooses its kernel library."""

from qwen_vllm.runtime.cpu import emulate_isa

emulate_isa()
