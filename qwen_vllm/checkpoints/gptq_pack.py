"""GPTQ tensors in the exact auto-gptq (v1) layout: a round-to-nearest packer
and the matching dequantizer.

Qwen's Int4/Int8 checkpoints were written by auto-gptq; each quantized
``nn.Linear`` of shape ``[out, in]`` becomes four tensors:

* ``qweight`` int32 ``[in // pack, out]``: ``pack = 32 // bits`` input rows per
  word, row ``k`` in bits ``bits * (k % pack)`` of word ``k // pack``;
* ``qzeros`` int32 ``[groups, out // pack]``: each group's zero point, packed
  the same way along the output dim and stored MINUS ONE (auto-gptq's v1
  format; symmetric 4-bit zeros are 8, stored 7 -> words 0x77777777);
* ``scales`` float16 ``[groups, out]``;
* ``g_idx`` int32 ``[in]``: the group of each input row (``k // group_size``
  without act-order).

The weight is ``(q - zero) * scale``. The fixtures use this packer to write
real quantized tensors and their exact float dequantization, so loading and
unpacking can be checked against a float run of the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class GPTQTensors:
    """One quantized linear layer in auto-gptq's layout (see module doc)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def as_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("qweight", "qzeros", "scales", "g_idx")}


def _check(bits: int, in_features: int, group_size: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")
    group = in_features if group_size == -1 else group_size
    if group <= 0 or in_features % group:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input features")
    return group


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide integers along ``dim``: element ``i`` goes
    to word ``i // pack`` at bit ``bits * (i % pack)`` (auto-gptq's order)."""
    pack = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % pack:
        raise ValueError(f"dimension {dim} ({v.shape[-1]}) is not a multiple of {pack}")
    v = v.reshape(*v.shape[:-1], -1, pack)
    shifts = torch.arange(pack, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    # Reinterpret the unsigned 32-bit words as int32 (the checkpoint dtype).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32` (values as int32 in ``[0, 2**bits)``)."""
    pack = 32 // bits
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(pack, dtype=torch.int64) * bits
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*w.shape[:-1], -1).to(torch.int32).movedim(-1, dim).contiguous()


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> GPTQTensors:
    """Symmetric round-to-nearest GPTQ quantization of ``weight`` ``[out, in]``,
    as auto-gptq's Quantizer(sym=True) does it: per group and output channel,
    ``scale = 2 * max|w| / (2**bits - 1)``, ``zero = 2**(bits - 1)``."""
    out_f, in_f = weight.shape
    group = _check(bits, in_f, group_size)
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    w = weight.detach().to(torch.float32).reshape(out_f, in_f // group, group)
    amax = w.abs().amax(-1).clamp(min=1e-8)
    scales = (2 * amax / maxq).to(torch.float16)  # [out, groups]; stored as fp16
    q = torch.round(w / scales.float().unsqueeze(-1)) + zero
    q = q.clamp(0, maxq).to(torch.int32).reshape(out_f, in_f)
    zeros = torch.full((in_f // group, out_f), zero - 1, dtype=torch.int32)  # v1: stored minus one
    return GPTQTensors(
        qweight=pack_int32(q.t(), bits, dim=0),
        qzeros=pack_int32(zeros, bits, dim=1),
        scales=scales.t().contiguous(),
        g_idx=torch.arange(in_f, dtype=torch.int32) // group,
    )


def dequantize(t: GPTQTensors, bits: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` that ``t`` encodes (exact: an fp16
    scale times a small integer is representable in float32)."""
    q = unpack_int32(t.qweight, bits, dim=0)  # [in, out]
    zeros = unpack_int32(t.qzeros, bits, dim=1) + 1  # v1 format stores zero - 1
    g = t.g_idx.long()
    w = (q - zeros[g]).to(torch.float32) * t.scales.to(torch.float32)[g]
    return w.t().contiguous()


def vllm_gptq_layer(
    kernel_cls: type, t: GPTQTensors, bits: int, group_size: int, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> tuple[Any, torch.nn.Module]:
    """One GPTQ layer as vLLM's ``AutoGPTQLinearMethod`` builds it on one rank
    (``qweight``/``scales``/``qzeros`` parameters with vLLM's dim attributes),
    prepared by the mixed-precision kernel class ``kernel_cls``: returns
    ``(kernel, layer)``; ``kernel.apply_weights(layer, x, layer.bias)`` runs it.
    For kernel tests and benchmarks without an engine."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    k, n = t.qweight.shape[0] * 32 // bits, t.qweight.shape[1]
    weight_type = scalar_types.uint4b8 if bits == 4 else scalar_types.uint8b128
    kernel = kernel_cls(MPLinearLayerConfig((k, n), (k, n), weight_type, dtype, group_size, False), "qweight", "scales", "qzeros")
    layer = torch.nn.Module()
    # The kernel prepares the layer's own bias (vLLM's W4A8 keeps it in float32).
    layer.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)
    for name, data, attrs in (
        ("qweight", t.qweight, {"input_dim": 0, "output_dim": 1, "packed_dim": 0}),
        ("scales", t.scales.to(dtype), {"input_dim": 0, "output_dim": 1}),
        ("qzeros", t.qzeros, {"input_dim": 0, "output_dim": 1, "packed_dim": 1}),
    ):
        param = torch.nn.Parameter(data.clone(), requires_grad=False)
        for key, value in attrs.items():
            setattr(param, key, value)
        layer.register_parameter(name, param)
    kernel.process_weights_after_loading(layer)
    return kernel, layer
