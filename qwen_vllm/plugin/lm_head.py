"""Qwen v1's lm_head and embedding on CPU: each held once, both opt-in int8.

Qwen v1 does not tie its lm_head to the embedding, and its 151,936 rows are a
large share of the model: 0.62 GB of Qwen-1.8B in bf16 (a fifth of the
weights), half of what an Int4 checkpoint's decode step reads (GPTQ leaves
lm_head in fp16). Two things on vLLM's CPU backend:

* **One copy.** vLLM packs the lm_head for oneDNN (its own copy of the
  weight) but keeps the unpacked weight too, since the same method serves
  embeddings, which look rows up. An untied lm_head never does, so
  :class:`QWenLMHeadMethod` lets vLLM's packer drop it (where vLLM falls back
  to ``F.linear`` it keeps it): the same logits, one lm_head less of memory.
* **int8, opt-in** (``additional_config={"qwen_int8_lm_head": true}``, vLLM's
  ``--additional-config``): each row stored as int8 with one scale (symmetric,
  round to nearest): a quarter of fp32's bytes, half of bf16's. vLLM's own
  oneDNN int8 GEMM runs it (``ops.onednn_scaled_mm``, as its W8A8 layers do:
  the hidden state rounded to int8 per token, dynamically), at the memory
  bandwidth for decode-sized batches; PyTorch's weight-only
  ``aten._weight_int8pack_mm`` where vLLM's build has no oneDNN or its int8
  GEMM cannot run (it keeps the activations but is slower than bf16 from 8
  rows on). It changes the logits
  by the rounding (docs/quantization.md); llama.cpp's Q4_0 files round their
  output matrix too (to 6 bits), and their activations to 8 bits. CPU only:
  refused on other devices before an engine starts; on CPUs without AVX-512
  it decodes slower than the float lm_head (measured, docs/performance.md),
  which a warning says when it is asked for there.
* **The embedding held once.** vLLM's CPU backend packs every vocabulary
  layer's weight for its GEMM beside the weight itself, the input embedding
  too, whose packed copy only an lm_head tied to it would use. Qwen v1's
  embedding (``wte``) is untied and only looks rows up:
  :class:`QWenEmbeddingMethod` keeps the weight and skips the packing, 0.58
  GiB less at Qwen-1.8B's shape in bf16, 1.16 GiB at 7B's.
* **int8 embedding, opt-in** (``{"qwen_int8_embedding": true}``): the
  embedding (as large as the lm_head; GPTQ leaves it in fp16 too) stored as
  the same int8 rows; a lookup gathers the
  rows and scales them back to the model's dtype, so the token's vector
  differs from the float one by the rounding alone (at most half a step of
  its row: ``max|row| / 254``). Half of a bf16 embedding's memory: 0.29 GiB at
  Qwen-1.8B's shape, 0.58 GiB at 7B's; no speed to gain or lose (one row per
  token). CPU only, like the int8 lm_head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
from vllm.model_executor.layers.vocab_parallel_embedding import (
    UnquantizedEmbeddingMethod,
)

from qwen_vllm.errors import QwenQuantizationError
from qwen_vllm.runtime.cpu import CpuCaps, cpu_caps

logger = init_logger(f"vllm.{__name__}")  # vLLM's log handler and format
INT8_KEY = "qwen_int8_lm_head"  # in vLLM's additional_config
INT8_EMBEDDING_KEY = "qwen_int8_embedding"  # likewise


def int8_wanted(additional_config: Any, key: str = INT8_KEY) -> bool:
    """Whether vLLM's ``additional_config`` asks for ``key`` (the int8 lm_head
    or embedding: a bool or nothing; anything else is an error naming the key)."""
    value = additional_config.get(key, False) if isinstance(additional_config, Mapping) else False
    if not isinstance(value, bool):
        raise QwenQuantizationError(f"additional_config {key!r} must be true or false, not {value!r}")
    return value


def check_int8_options(additional_config: Any, *, on_cpu: bool) -> None:
    """Refuse the int8 lm_head and embedding where they do not run, and warn
    where the lm_head runs slower than the float one (before an engine starts)."""
    for key in (k for k in (INT8_KEY, INT8_EMBEDDING_KEY) if int8_wanted(additional_config, k)):
        if not on_cpu:
            raise QwenQuantizationError(
                f"additional_config {key!r} is a CPU option (qwen-vllm's CPU vocabulary layers); leave it out on GPUs"
            )
        if key == INT8_KEY and (advice := int8_lm_head_advice(cpu_caps())) is not None:
            logger.warning(advice)


def int8_lm_head_advice(caps: CpuCaps) -> str | None:
    """Why not to use the int8 lm_head on a CPU of ``caps``'s kind, if so."""
    if caps.avx512:
        return None
    return (
        f"additional_config {INT8_KEY!r}: on a CPU without AVX-512 (this one: {caps.isa}) the int8 lm_head "
        "decodes slower than the float one (measured 0.59x with Int4 layers, 0.82x with float32 ones, at "
        "batch 1; docs/performance.md); leave it out here"
    )


# Rows rounded at a time: the float32 scratch stays 32 MiB at Qwen-7B's 4096
# columns. Rounding a whole vocabulary matrix at once held three float32 copies
# of it: loading peaked 6.96 GiB above a bf16 Qwen-7B-shaped matrix (1.16 GiB),
# 0.64 GiB chunked (docs/performance.md).
QUANTIZE_CHUNK_ROWS = 2048


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row): ``weight ~ values * scale[:, None]``,
    symmetric, round to nearest, |values| <= 127 (an all-zero row: scale 1).
    A chunk of rows at a time, so loading holds the int8 result and one chunk
    beside the weight."""
    values = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for r0 in range(0, weight.shape[0], QUANTIZE_CHUNK_ROWS):
        rows = slice(r0, r0 + QUANTIZE_CHUNK_ROWS)
        w = weight[rows].to(torch.float32, copy=True)
        s = w.abs().amax(dim=1).div_(127)
        s = torch.where(s > 0, s, torch.ones_like(s))
        scale[rows] = s
        values[rows] = w.div_(s[:, None]).round_().clamp_(-127, 127)
    return values, scale


def _w8a8(handler: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (rounded to int8 per token, dynamically) times the handler's int8 rows."""
    from vllm import _custom_ops as ops

    x_q, x_scale, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
    out = torch.empty((x.shape[0], handler.n), dtype=x.dtype)
    ops.onednn_scaled_mm(handler, x_q, out, x_scale, x_zp, None, bias)
    return out


def _onednn_int8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Any:
    """vLLM's oneDNN int8 GEMM handler for the int8 rows, or None where this
    CPU or build cannot run it with ``dtype`` output (tried once here: oneDNN
    builds its kernel at the first call)."""
    from vllm import _custom_ops as ops

    try:
        handler = ops.create_onednn_scaled_mm(values.t(), scale, dtype, True, False, 32)
        _w8a8(handler, torch.ones(1, values.shape[1], dtype=dtype), None)
        return handler
    except RuntimeError as exc:
        logger.warning("int8 lm_head: vLLM's oneDNN int8 GEMM cannot run here (%s); using PyTorch's weight-only kernel", exc)
        return None


class QWenLMHeadMethod(UnquantizedEmbeddingMethod):
    """vLLM's method for an untied CPU lm_head, keeping one copy of it
    (``int8``: the int8 rows instead)."""

    def __init__(self, int8: bool = False) -> None:
        super().__init__()
        self.int8 = int8

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from vllm import _custom_ops as ops

        if not self.int8:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            return
        values, scale = quantize_rows(layer.weight.data)
        row_scale = scale.view(1, -1)  # a handler reads it: kept on the layer
        layer.int8_handler = _onednn_int8(values, row_scale, layer.params_dtype) if ops._supports_onednn else None
        if layer.int8_handler is not None:  # the rows are packed inside it, as vLLM's W8A8 layers do
            values, scale = torch.empty(0, dtype=torch.int8), row_scale
        else:  # PyTorch's kernel takes the scales in the activation dtype
            scale = scale.to(layer.params_dtype)
        layer.int8_scale = torch.nn.Parameter(scale, requires_grad=False)
        layer.weight = torch.nn.Parameter(values, requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.int8:
            return super().apply(layer, x, bias)
        x = x.contiguous()
        if layer.int8_handler is not None:
            return _w8a8(layer.int8_handler, x, bias)
        scale = layer.int8_scale if layer.int8_scale.dtype == x.dtype else layer.int8_scale.to(x.dtype)
        out = torch.ops.aten._weight_int8pack_mm(x, layer.weight, scale)
        return out if bias is None else out + bias

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Qwen v1's lm_head is not tied to the embedding: it looks nothing up")


class QWenEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's method for an untied CPU embedding: the weight alone, no packed
    copy for a GEMM it never runs (``int8``: the int8 rows instead)."""

    def __init__(self, int8: bool = False) -> None:
        super().__init__()
        self.int8 = int8

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not self.int8:
            return
        values, scale = quantize_rows(layer.weight.data)
        layer.int8_scale = torch.nn.Parameter(scale[:, None], requires_grad=False)  # float32, one per row
        layer.weight = torch.nn.Parameter(values, requires_grad=False)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            return super().embedding(layer, input_)
        rows = F.embedding(input_, layer.weight).float() * F.embedding(input_, layer.int8_scale)
        return rows.to(layer.params_dtype)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError("Qwen v1's embedding is not tied to the lm_head: it computes no logits")


def install(model: torch.nn.Module, vllm_config: Any) -> None:
    """On CPU, for an untied model: give ``model.lm_head`` :class:`QWenLMHeadMethod`
    and the embedding :class:`QWenEmbeddingMethod`, each where it is an
    unquantized vLLM layer (not a pipeline-parallel placeholder)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or model.config.tie_word_embeddings:
        return
    head, embedding = getattr(model, "lm_head", None), getattr(model.model, "embed_tokens", None)
    if type(getattr(head, "quant_method", None)) is UnquantizedEmbeddingMethod:
        head.quant_method = QWenLMHeadMethod(int8_wanted(vllm_config.additional_config))
    if type(getattr(embedding, "quant_method", None)) is UnquantizedEmbeddingMethod:
        embedding.quant_method = QWenEmbeddingMethod(int8_wanted(vllm_config.additional_config, INT8_EMBEDDING_KEY))
