"""GPTQ Int4 on CPUs whose vLLM build lacks ``cpu_gemm_wna16`` (AVX2 x86).

vLLM's CPU backend runs 4-bit GPTQ layers with ``CPUWNA16LinearKernel``,
which calls the C++ op ``torch.ops._C.cpu_gemm_wna16``. The op is compiled
only into vLLM's AVX-512 library; on an AVX2-only CPU (``_C_AVX2``) a GPTQ
Int4 model loads and then fails at its first forward pass. ``install()``
(run by the plugin's ``register()`` in every vLLM process) defines the same
op, with the same schema, in plain torch -- and only when vLLM's own kernels
do not provide it, so an AVX-512/AMX machine keeps the native kernel.

What the op receives (after ``CPUWNA16LinearKernel._process_gptq_weights_w4a16``):

* ``q_weight`` int32 ``[N / 16, K * 2]``: output channels in blocks of 16;
  within a block, row ``k`` is two words holding channels ``8 t + i`` at
  bits ``4 i`` of word ``t`` -- so, read as bytes, byte ``j`` of a row holds
  channel ``2 j`` (low nibble) and ``2 j + 1`` (high nibble);
* ``scales`` ``[groups, N]`` in the activation dtype;
* ``zeros`` None for symmetric GPTQ (the stored values are ``uint4b8``: the
  weight is ``(q - 8) * scale``), else int32 ``[groups, N / 8]`` zero points
  packed along N (``(q - zero) * scale``);
* ``output`` ``[M, N]``, filled in place; ``bias`` optional ``[N]``.

The fallback dequantizes a column chunk at a time into reused float32
scratch buffers and multiplies in float32 (fresh multi-megabyte tensors
cost more in page faults than the arithmetic), so the product is the exact
dequantized weight times the activations, rounded once to the output dtype.
"""

from __future__ import annotations

import torch

OP_NAME = "cpu_gemm_wna16"
# The schema vLLM's C++ library registers (csrc/cpu/torch_bindings.cpp).
SCHEMA = (
    "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, "
    "Tensor? zeros, Tensor? bias, SymInt pack_factor, str isa_hint) -> ()"
)
# Dequantized elements per chunk: 4M float32 = 16 MiB of scratch, reused.
CHUNK_ELEMENTS = 1 << 22
BLOCK = 16  # output channels per block in the CPUWNA16 layout

_library: torch.library.Library | None = None
_scratch: dict[str, torch.Tensor] = {}


def native_kernel_available() -> bool:
    """True if vLLM's loaded C++ library defines ``_C::cpu_gemm_wna16``."""
    try:
        getattr(torch.ops._C, OP_NAME)
    except (AttributeError, RuntimeError):
        return False
    return True


def install() -> bool:
    """Define the fallback op if (and only if) the native one is missing.

    Idempotent; returns True when the fallback is (now) the implementation.
    """
    global _library
    if _library is not None:
        return True
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    # Load vLLM's own kernels first: defining the op before an AVX-512 build
    # registers it would make that registration fail.
    current_platform.import_kernels()
    if native_kernel_available():
        return False
    library = torch.library.Library("_C", "FRAGMENT")
    library.define(SCHEMA)
    library.impl(OP_NAME, gemm_wna16, "CPU")
    torch.library.register_fake(f"_C::{OP_NAME}", _gemm_wna16_fake, lib=library)
    _library = library
    return True


def _gemm_wna16_fake(input, q_weight, output, scales, zeros, bias, pack_factor, isa_hint) -> None:
    """Shape-only version for torch.compile tracing: the op only writes ``output``."""
    return None


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _scratch.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        _scratch[name] = buf
    return buf[:numel]


def unpack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """int32 ``[groups, N / 8]`` nibble-packed zero points -> int8 ``[groups, N]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((zeros.unsqueeze(-1) >> shifts) & 15).reshape(zeros.shape[0], -1).to(torch.int8)


def gemm_wna16(
    input: torch.Tensor,
    q_weight: torch.Tensor,
    output: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_factor: int,
    isa_hint: str,
) -> None:
    """``output = input @ dequant(q_weight) (+ bias)`` in the CPUWNA16 layout."""
    if pack_factor != 8:
        raise ValueError(f"cpu_gemm_wna16 fallback: only 4-bit weights (pack_factor 8), got {pack_factor}")
    m, k = input.shape
    blocks = q_weight.shape[0]
    n = blocks * BLOCK
    groups = scales.shape[0]
    if q_weight.shape[1] != 2 * k or scales.shape[1] != n or output.shape != (m, n) or k % groups:
        raise ValueError(
            f"cpu_gemm_wna16 fallback: inconsistent shapes input {tuple(input.shape)}, "
            f"q_weight {tuple(q_weight.shape)}, scales {tuple(scales.shape)}, output {tuple(output.shape)}"
        )
    group_size = k // groups
    x = input.to(torch.float32)
    scales32 = scales.to(torch.float32)
    zeros8 = unpack_zeros(zeros) if zeros is not None else None
    # [K, blocks, 8 bytes]: byte j of block b, row k holds channels 16 b + 2 j, 2 j + 1.
    packed = q_weight.view(torch.uint8).view(blocks, k, 8).permute(1, 0, 2)
    step = max(1, CHUNK_ELEMENTS // (k * BLOCK))
    for b0 in range(0, blocks, step):
        b1 = min(b0 + step, blocks)
        cols = (b1 - b0) * BLOCK
        c0, c1 = b0 * BLOCK, b1 * BLOCK
        nibbles = _buffer("nibbles", k * cols, torch.int8).view(k, b1 - b0, 8, 2)
        src = packed[:, b0:b1]
        torch.bitwise_and(src, 15, out=nibbles[..., 0].view(torch.uint8))
        torch.bitwise_right_shift(src, 4, out=nibbles[..., 1].view(torch.uint8))
        weight = _buffer("weight", k * cols, torch.float32).view(groups, group_size, cols)
        if zeros8 is None:
            nibbles.sub_(8)  # uint4b8: stored value minus 8
            weight.copy_(nibbles.view(groups, group_size, cols))
        else:
            weight.copy_(nibbles.view(groups, group_size, cols))
            weight.sub_(zeros8[:, c0:c1].unsqueeze(1))
        weight.mul_(scales32[:, c0:c1].unsqueeze(1))
        result = _buffer("result", m * cols, torch.float32).view(m, cols)
        torch.matmul(x, weight.view(k, cols), out=result)
        if bias is not None:
            result.add_(bias[c0:c1].to(torch.float32))
        output[:, c0:c1].copy_(result)
