"""vLLM CPU-backend defaults for the wrapper, worker and stack.

By default vLLM's CPU backend binds its OpenMP threads to all cores but the
one it reserves for the scheduler process; on a 2-core machine that halves
compute. Binding every core measured +50% tokens/s at batch 1 and +77% at
batch 8 at the Qwen-1.8B shape (DESIGN.md; ``qwen-vllm bench`` re-measures
it). Anything the user already set in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# KV-cache space in GiB when the user sets none. vLLM's own CPU default is
# 90% of RAM minus what the process holds: on a shared host that starves every
# other process, and a second engine fails to start. Qwen v1 has no GQA, so a
# token costs layers x 2 x hidden x dtype bytes: 384 KiB for 1.8B in fp32,
# 512 KiB for 7B in bf16 (1 MiB in fp32). 4 GiB holds one full 8K context of
# 1.8B fp32 or 7B bf16 (``qwen-vllm bench cpu-defaults`` prints the capacity).
DEFAULT_KVCACHE_GIB = 4


def on_cpu() -> bool:
    """True when vLLM will run on its CPU backend (no CUDA device)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def thread_binding(tensor_parallel_size: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value giving each TP rank an equal share of ``cores``."""
    if tensor_parallel_size < 1 or tensor_parallel_size > len(cores):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs at least that many CPU cores "
            f"(this process may use {len(cores)})"
        )
    share = len(cores) // tensor_parallel_size
    groups = [cores[r * share : (r + 1) * share] for r in range(tensor_parallel_size)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def apply_cpu_defaults(tensor_parallel_size: int = 1, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set our CPU defaults in ``environ`` (os.environ) where unset; returns what was set."""
    environ = os.environ if environ is None else environ
    if not on_cpu():
        return {}
    chosen = {}
    if "VLLM_CPU_OMP_THREADS_BIND" not in environ:
        chosen["VLLM_CPU_OMP_THREADS_BIND"] = thread_binding(tensor_parallel_size, sorted(os.sched_getaffinity(0)))
    if "VLLM_CPU_KVCACHE_SPACE" not in environ:
        chosen["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KVCACHE_GIB)
    environ.update(chosen)
    return chosen
