"""What this CPU can do under vLLM, and vLLM CPU-backend defaults for the
wrapper, worker and stack.

vLLM loads a different kernel library per x86 CPU kind (``vllm/platforms/
cpu.py`` ``import_kernels``): ``_C`` (AVX-512 with BF16) or ``_C_AVX512``,
both with the native Int4 GEMM ``cpu_gemm_wna16``, or ``_C_AVX2`` without it
(GPTQ runs on PyTorch's kernels instead: plugin/cpu_gptq.py).
Its CPU attention stores an FP8 KV cache only with AVX-512 or AMX, and its
GPTQ kernel runs bf16 Int4 layers with int8 activations (W4A8) on AMX.
:func:`cpu_caps` says which of these hold here, for the checks, the tests
and the bench reports.

By default vLLM's CPU backend binds its OpenMP threads to all cores but the
one it reserves for the scheduler process; on a 2-core machine that halves
compute. ``qwen-vllm bench cpu-defaults`` measures binding every core
(docs/performance.md). Anything the user already set in the environment wins.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuCaps:
    """The CPU features vLLM's CPU backend branches on."""

    x86: bool
    avx512: bool
    amx: bool
    bf16: bool = False  # AVX512_BF16 or AMX: bf16 GEMMs run natively, not emulated

    @property
    def float_dtype(self) -> str:
        """The float dtype ``dtype="auto"`` runs here: bf16 (Qwen's own) where
        the CPU computes it natively (1.7x float32's decode speed on AMX,
        docs/performance.md), else float32, which is what Qwen's code picks on
        any CPU: bf16 GEMMs are emulated there."""
        return "bfloat16" if self.bf16 else "float32"

    @property
    def isa(self) -> str:
        if not self.x86:
            return f"not x86 ({platform.machine()})"
        return "AVX-512 + AMX" if self.amx else "AVX-512" if self.avx512 else "AVX2 only"

    @property
    def fp8_kv_cache(self) -> bool:
        return self.avx512 or self.amx

    def int4_path(self, dtype: str) -> str:
        """Which kernel runs a GPTQ Int4 layer with activations in ``dtype``
        (plugin/cpu_gptq.py where vLLM's library has none)."""
        if not self.avx512 or dtype != "bfloat16":
            return "qwen-vllm int4pack (PyTorch)"
        if self.amx and os.environ.get("VLLM_CPU_INT4_W4A8", "1") != "0":
            return "vLLM W4A8 (int8 activations, AMX)"
        return "vLLM W4A16 (cpu_gemm_wna16)"

    def describe(self) -> str:
        """One line for logs, CI and bench reports."""
        library = "_C_AVX512" if self.avx512 else "_C_AVX2" if self.x86 else "_C"
        return (
            f"CPU: {self.isa}; vLLM kernels {library}; Int4 GEMM "
            f"{'bf16 vLLM, fp16 qwen-vllm' if self.avx512 else 'qwen-vllm'}; Int8 GEMM qwen-vllm; FP8 KV cache "
            f"{'yes' if self.fp8_kv_cache else 'no'}; dtype auto {self.float_dtype}"
        )


@functools.cache
def cpu_caps() -> CpuCaps:
    """This machine's :class:`CpuCaps`, as vLLM's CPU backend tests them."""
    import torch

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    amx = x86 and torch.cpu._is_amx_tile_supported()
    bf16 = amx or (x86 and torch.cpu._is_avx512_bf16_supported())
    return CpuCaps(x86, x86 and torch.cpu._is_avx512_supported(), amx, bf16)

# ``qwen-vllm bench --cpu-isa avx2`` runs a bench on an AVX-512 machine as an
# AVX2-only CPU runs it: every Python process of its jobs starts with
# ``runtime/avx2_site/sitecustomize.py`` on its path, which calls
# :func:`emulate_isa` before vLLM picks its kernel library; PyTorch, oneDNN and
# MKL are capped at AVX2 by their own variables. The memory system stays this
# machine's: the figures show the AVX2 kernels, not an AVX2 machine's bandwidth.
ISA_ENV = "QWEN_VLLM_CPU_ISA"
_TORCH_CPU_FEATURES = (  # what vLLM and cpu_caps() ask (torch.cpu, read at each call)
    "_is_avx512_supported",
    "_is_avx512_bf16_supported",
    "_is_avx512_vnni_supported",
    "_is_amx_tile_supported",
    "_is_amx_fp16_supported",
)


def avx2_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables under which every process started with them sees this
    x86 CPU as AVX2-only (``environ``'s PYTHONPATH kept behind ours)."""
    environ = os.environ if environ is None else environ
    site = str(Path(__file__).with_name("avx2_site"))
    return {
        ISA_ENV: "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "PYTHONPATH": os.pathsep.join(filter(None, [site, environ.get("PYTHONPATH")])),
    }


def emulate_isa() -> None:
    """Under ``QWEN_VLLM_CPU_ISA=avx2`` (:func:`avx2_environment`), make
    PyTorch's CPU feature tests answer as on an AVX2-only CPU; else nothing."""
    if os.environ.get(ISA_ENV) != "avx2":
        return
    try:
        import torch
    except ImportError:  # a process without PyTorch (the bench's llama.cpp server): nothing asks
        return

    for name in _TORCH_CPU_FEATURES:
        setattr(torch.cpu, name, lambda: False)
    cpu_caps.cache_clear()


# KV-cache space in GiB when the user sets none. vLLM's own CPU default is
# 90% of RAM minus what the process holds: on a shared host that starves every
# other process, and a second engine fails to start. Qwen v1 has no GQA, so a
# token costs layers x 2 x hidden x dtype bytes: 384 KiB for 1.8B in fp32,
# 512 KiB for 7B in bf16 (1 MiB in fp32). 4 GiB holds one full 8K context of
# 1.8B fp32 or 7B bf16 (``qwen-vllm bench cpu-defaults`` prints the capacity).
DEFAULT_KVCACHE_GIB = 4


def default_float_dtype() -> str:
    """The dtype when config.json sets no precision flag (and the bench's
    default): bf16, as Qwen's own code picks on GPUs (vLLM falls back to fp16
    on GPUs without bf16); on a CPU, :attr:`CpuCaps.float_dtype`."""
    return cpu_caps().float_dtype if on_cpu() else "bfloat16"


def on_cpu() -> bool:
    """True when vLLM will run on its CPU backend (no CUDA device)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def thread_binding(tensor_parallel_size: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value giving each TP rank an equal share of ``cores``."""
    if tensor_parallel_size < 1 or tensor_parallel_size > len(cores):
        from qwen_vllm.errors import QwenSettingsError

        raise QwenSettingsError(
            f"tensor_parallel_size={tensor_parallel_size} needs at least that many CPU cores "
            f"(this process may use {len(cores)})"
        )
    share = len(cores) // tensor_parallel_size
    groups = [cores[r * share : (r + 1) * share] for r in range(tensor_parallel_size)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


# vLLM's CPU install guide LD_PRELOADs tcmalloc and Intel OpenMP, and its CPU
# worker warns at every start when they are absent. Opt-in: on a 2-core
# AVX-512 + AMX machine two runs of ``qwen-vllm bench cpu-defaults
# --compare-preload`` measured 1.05x / 1.05x and 1.00x / 0.97x at batch 1 / 8
# (docs/performance.md), no gain beyond the noise. Each entry: the names to
# look for, and the LD_PRELOAD words that mean "already chosen" (vLLM asserts
# that Intel and GNU OpenMP are not both preloaded).
PRELOAD_LIBS = (
    (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), ("libtcmalloc", "libjemalloc")),
    (("libiomp5.so",), ("libiomp", "libomp", "libgomp")),
)
PRELOAD_ENV = "QWEN_VLLM_PRELOAD"  # "1": preload them (else LD_PRELOAD is left to vLLM)


def _library_dirs() -> list[Path]:
    """Where pip (intel-openmp: the environment's lib/) and Debian
    (libtcmalloc-minimal4) install these libraries."""
    multiarch = f"/usr/lib/{platform.machine()}-linux-gnu"
    return [Path(sys.prefix) / "lib", Path(multiarch), Path("/usr/lib64"), Path("/usr/lib")]


def preload_value(current: str) -> str | None:
    """LD_PRELOAD with the installed :data:`PRELOAD_LIBS` added to ``current``
    (None when nothing is to add)."""
    dirs = _library_dirs()
    add = []
    for names, taken in PRELOAD_LIBS:
        if any(word in current for word in taken):
            continue
        found = next((d / n for n in names for d in dirs if (d / n).is_file()), None)
        if found is not None:
            add.append(str(found))
    return ":".join([*add, current] if current else add) if add else None


def apply_cpu_defaults(tensor_parallel_size: int = 1, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set our CPU defaults in ``environ`` (os.environ) where unset; returns
    what was set. Engine processes start after this, so LD_PRELOAD reaches them."""
    environ = os.environ if environ is None else environ
    if not on_cpu():
        return {}
    chosen = {}
    if environ.get(PRELOAD_ENV) == "1" and (preload := preload_value(environ.get("LD_PRELOAD", ""))):
        chosen["LD_PRELOAD"] = preload
    if "VLLM_CPU_OMP_THREADS_BIND" not in environ:
        chosen["VLLM_CPU_OMP_THREADS_BIND"] = thread_binding(tensor_parallel_size, sorted(os.sched_getaffinity(0)))
    if "VLLM_CPU_KVCACHE_SPACE" not in environ:
        chosen["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KVCACHE_GIB)
    environ.update(chosen)
    return chosen


@contextlib.contextmanager
def engine_environment(tensor_parallel_size: int = 1) -> Iterator[dict[str, str]]:
    """Our CPU defaults while an engine starts inside the caller's process
    (the wrapper): the engine processes it spawns inherit them. Everything is
    put back afterwards: programs the caller starts later do not load tcmalloc
    and Intel OpenMP (vLLM's libgomp addition to LD_PRELOAD goes too), and a
    second engine with another tensor-parallel size gets its own core binding."""
    chosen = apply_cpu_defaults(tensor_parallel_size, dict(os.environ))  # what it would set
    before = {k: os.environ.get(k) for k in ("LD_PRELOAD", *chosen)}  # vLLM itself may add to LD_PRELOAD
    os.environ.update(chosen)
    try:
        yield chosen
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
