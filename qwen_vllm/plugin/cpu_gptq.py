"""GPTQ on CPU: Int8 everywhere, Int4 wherever vLLM's own kernel is missing or slower.

vLLM's CPU backend runs GPTQ layers with ``CPUWNA16LinearKernel``: 4-bit
only, through C++ ops compiled into its AVX-512 library alone (``cpu_gemm_wna16``,
and W4A8 ``int4_scaled_mm_cpu`` for bf16 on AMX). On an AVX2 CPU an Int4 model
fails at its first forward pass; 8-bit GPTQ is refused everywhere; fp16 Int4
layers run 1.1-2x slower than with this kernel (docs/quantization.md). vLLM
builds GPTQ layers in fp16 or bf16 only.
:func:`install` (run by the plugin's ``register()`` in every vLLM process) puts
:class:`TorchGPTQLinearKernel`, built on PyTorch's own weight-only kernels,
first in vLLM's CPU kernel list; it leaves bf16 Int4 layers to vLLM where
vLLM's library has its kernels (faster there: W4A8 on AMX).

* **Int4** (``uint4b8``): the weight stays compressed, repacked once at load into PyTorch's int4pack layout
  (``aten._convert_weight_to_int4pack_for_cpu``; the layout follows ATen's CPU
  capability). ``M < DENSE_FROM_M`` runs ``aten._weight_int4pack_mm_for_cpu``;
  larger ``M`` (prefill) dequantizes a block of output channels at a time and
  multiplies densely (:func:`dense_dtype_for`), where the GEMM, not reading the
  weight, is the cost.
* **Int8** (``uint8b128``): dequantized once at load to the activation dtype and
  run as a float linear. PyTorch's ``_weight_int8pack_mm`` takes per-channel
  scales only; run once per GPTQ group it decoded the Qwen-1.8B shape at 0.84x
  bf16 at batch 1 and 0.26x at batch 8 (docs/quantization.md), so Int8 on CPU
  trades its memory saving for float speed.

PyTorch vectorizes int4pack for bf16 activations only, so decode runs in bf16
whatever the model's dtype: activations and scales rounded to 8 bits, far
below the quantization's own error. docs/quantization.md has the
measurements and the bounds the tests hold it to.
"""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.kernels.linear import MPLinearKernel, MPLinearLayerConfig
from vllm.model_executor.layers.quantization.utils import replace_parameter
from vllm.scalar_type import scalar_types

# Rows from which an Int4 layer dequantizes its weight and runs a dense GEMM
# instead of int4pack: int4pack beats dequantize + GEMM up to ~96 rows on AVX2
# (docs/quantization.md, "GPTQ on CPU").
DENSE_FROM_M = 96
# Output channels dequantized at a time on the dense path: bounds its scratch
# (K x 512 values: 5.6 MB in fp32 for K = 2752) and keeps it in cache.
DENSE_BLOCK_N = 512
# PyTorch's int4pack kernel takes these group sizes; GPTQ's per-channel (-1) and
# larger groups are expressed as the largest of them dividing K, scales repeated.
TORCH_GROUP_SIZES = (256, 128, 64, 32)
BITS = {scalar_types.uint4b8: 4, scalar_types.uint8b128: 8}
# PyTorch vectorizes int4pack (AVX2 and AVX-512) for bf16 activations only;
# fp32 and fp16 run scalar code, 40-60x slower at M = 1.
COMPUTE = torch.bfloat16


def vllm_native_int4() -> bool:
    """vLLM's loaded CPU library has ``cpu_gemm_wna16`` (its AVX-512 builds)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


@functools.cache
def dense_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dense path's GEMM dtype: the activations' on AVX-512 (bf16 on AMX),
    float32 on CPUs without AVX-512, whose bf16/fp16 GEMMs are emulated and 3-5x
    slower than float32."""
    return dtype if torch.cpu._is_avx512_supported() else torch.float32


@functools.cache
def int4pack_layout() -> tuple[int, bool]:
    """(output channels per block, whether a byte holds channels j and j + block/2)
    of ``_convert_weight_to_int4pack_for_cpu`` in this process: the layout follows
    ATen's CPU capability (64 and True under AVX-512; 32 under AVX2), so it is
    found by packing a probe rather than assumed."""
    probe = torch.zeros(64, 2, dtype=torch.int32)
    probe[32, 0] = 1
    if torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)[0].item() == 0x10:
        return 64, True
    probe.zero_()
    probe[1, 0] = 1
    halves = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)[1].item() == 0x01
    return 32, halves


def torch_group_size(k: int, group_size: int) -> int:
    """The int4pack group size for GPTQ's ``group_size`` (-1: one group of K)."""
    g = k if group_size == -1 else group_size
    for size in TORCH_GROUP_SIZES:
        if g % size == 0 and k % size == 0:
            return size
    raise ValueError(f"GPTQ group_size {group_size} with {k} inputs has no PyTorch int4pack equivalent")


def _dense_block(weight: torch.Tensor, scales: torch.Tensor, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """Output channels ``n0:n1`` of the dequantized int4pack weight, ``[n1 - n0, K]`` in ``dtype``."""
    block, halves = int4pack_layout()
    k = weight.shape[1] * 2
    packed = weight.view(-1, k, block // 2)[n0 // block : n1 // block]  # [blocks, K, block / 2]
    q = torch.empty(packed.shape[0], block, k, dtype=torch.uint8)
    low, high = (q[:, : block // 2], q[:, block // 2 :]) if halves else (q[:, 0::2], q[:, 1::2])
    torch.bitwise_and(packed, 15, out=low.transpose(1, 2))
    torch.bitwise_right_shift(packed, 4, out=high.transpose(1, 2))
    w = q.view(n1 - n0, scales.shape[0], -1).view(torch.int8).sub_(8).to(dtype)
    return w.mul_(scales[:, n0:n1].t().unsqueeze(-1)).view(n1 - n0, k)


def int4_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, packed_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ dequant(weight).T (+ bias)`` for an int4pack ``weight`` (uint8 ``[N, K / 2]``);
    ``scales`` ``[groups, N]`` in the activation dtype (dense path) and ``packed_scales``
    ``[groups, N, 2]`` (scale, additive zero 0) in bf16, as int4pack takes them: both
    made once at load, so decode converts nothing but ``x``. The path by ``x``'s rows
    (module docstring)."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1] * 2
    if m >= DENSE_FROM_M:
        dtype = dense_dtype_for(x.dtype)
        xd, s, out = x.to(dtype), scales.to(dtype), torch.empty(m, n, dtype=x.dtype)
        for n0 in range(0, n, DENSE_BLOCK_N):
            n1 = min(n, n0 + DENSE_BLOCK_N)
            out[:, n0:n1] = xd @ _dense_block(weight, s, n0, n1, dtype).t()
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(COMPUTE), weight, k // scales.shape[0], packed_scales)
        out = out.to(x.dtype)
    return out if bias is None else out.add_(bias)


@torch.library.custom_op("qwen_vllm::int4_linear", mutates_args=())
def _int4_linear_op(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, packed_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One opaque op for torch.compile: the path by batch size is chosen at run time."""
    return int4_linear(x, weight, scales, packed_scales, bias)


@_int4_linear_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, packed_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class TorchGPTQLinearKernel(MPLinearKernel):
    """vLLM mixed-precision linear kernel for symmetric GPTQ Int4/Int8 on CPU."""

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        from vllm.platforms import current_platform

        k, n = c.partition_weight_shape
        if not current_platform.is_cpu():
            return False, "CPU only"
        if c.weight_type not in BITS or c.zero_points:
            return False, f"symmetric GPTQ Int4/Int8 only, not {c.weight_type} with zero points={c.zero_points}"
        if BITS[c.weight_type] == 4 and c.act_type == torch.bfloat16 and vllm_native_int4():
            return False, "vLLM's own kernels run bf16 Int4 faster here (W4A8 on AMX, else cpu_gemm_wna16)"
        if c.act_type not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {c.act_type}"
        block = int4pack_layout()[0] if BITS[c.weight_type] == 4 else 1
        if n % block or k % 32:
            return False, f"{k} inputs x {n} outputs: needs inputs a multiple of 32 and outputs of {block}"
        try:
            torch_group_size(k, c.group_size)
        except ValueError as e:
            return False, str(e)
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Once per layer: GPTQ's row-packed int32 weight -> int4pack, its scales in
        the activation dtype and in int4pack's bf16 form (Int4), or the dequantized
        float weight (Int8)."""
        # auto-gptq's bit order has one definition (checkpoints/gptq_pack.py)
        from qwen_vllm.checkpoints.gptq_pack import unpack_int32

        bits = BITS[self.config.weight_type]
        act = self.config.act_type
        q = unpack_int32(getattr(layer, self.w_q_name).data, bits, dim=0).t().to(torch.uint8).contiguous()  # [N, K]
        scales = getattr(layer, self.w_s_name).data.to(torch.float32)  # [groups, N]
        n, k = q.shape
        if bits == 4:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            repeat = (k // scales.shape[0]) // torch_group_size(k, self.config.group_size)
            scales = scales.repeat_interleave(repeat, 0)
            # Through the activation dtype, as the per-call conversion this replaces rounded them.
            packed = torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(act).to(COMPUTE)
            layer.register_parameter("int4pack_scales", torch.nn.Parameter(packed, requires_grad=False))
        else:  # (q - 128) * scale, [N, K], rounded once to the activation dtype
            weight = (q.view(n, scales.shape[0], -1).float() - 128).mul_(scales.t().unsqueeze(-1)).view(n, k).to(act)
            scales = torch.empty(0)
        replace_parameter(layer, self.w_q_name, torch.nn.Parameter(weight, requires_grad=False))
        replace_parameter(layer, self.w_s_name, torch.nn.Parameter(scales.to(act).contiguous(), requires_grad=False))
        if self.w_zp_name is not None:
            setattr(layer, self.w_zp_name, None)  # symmetric: GPTQ's stored zeros are all 8 / 128
        layer.gptq_bits = bits

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w, s, _ = self._get_weight_params(layer)
        if layer.gptq_bits == 8:
            return torch.nn.functional.linear(x, w, bias)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.qwen_vllm.int4_linear(x2, w, s, layer.int4pack_scales, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _allow_int8() -> None:
    """vLLM's GPTQ method first asks which types its CPU kernels take
    (``verify_marlin_supported`` -> ``_query_cpu_marlin_supported_quant_types``
    in marlin_utils.py: ``uint4b8`` only) and refuses 8-bit GPTQ before any
    kernel is chosen; this kernel runs ``uint8b128`` too."""
    from vllm.model_executor.layers.quantization.utils import marlin_utils

    query = marlin_utils._query_cpu_marlin_supported_quant_types
    if getattr(query, "qwen_vllm", False):
        return

    def with_int8(has_zp: bool | None = None, include_fp_type: bool = True) -> list:
        types = query(has_zp, include_fp_type)
        return types if has_zp else [*types, scalar_types.uint8b128]

    with_int8.qwen_vllm = True
    marlin_utils._query_cpu_marlin_supported_quant_types = with_int8


def install() -> bool:
    """Put :class:`TorchGPTQLinearKernel` first among vLLM's CPU mixed-precision
    kernels (idempotent; False off CPU). ``register_linear_kernel`` appends, and
    vLLM takes the first kernel that can implement a layer."""
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum, current_platform

    if not current_platform.is_cpu():
        return False
    _allow_int8()
    kernels = linear._POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if TorchGPTQLinearKernel not in kernels:
        linear.register_linear_kernel(TorchGPTQLinearKernel, PlatformEnum.CPU, "mp")
        kernels.remove(TorchGPTQLinearKernel)
        kernels.insert(0, TorchGPTQLinearKernel)
    return True
