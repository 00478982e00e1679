"""QWenLMHeadModel for vLLM: Qwen v1 weights on vLLM's own Qwen2 layers.

Qwen v1 is Qwen2 with one K/V head per attention head, a biased fused QKV
(``c_attn``) and unbiased projections, so the model is vLLM's
``Qwen2ForCausalLM`` plus a weight-name mapping. ``c_attn`` is loaded as one
fused tensor: ``QKVParallelLinear``'s loader splits q/k/v (weight and bias)
before taking each tensor-parallel rank's slice. ``w2`` is the gate and
``w1`` the up projection (Qwen computes ``w1(x) * silu(w2(x))``).

Beyond ``seq_length`` (only when the engine's max_model_len asks for it) the
layers get Qwen's dynamic NTK rotary + LogN (``qwen_vllm.plugin.long_context``), fed
per-request positions through vLLM's M-RoPE hook. On CPU the untied lm_head is
held once, or as int8 when asked (``qwen_vllm.plugin.lm_head``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader

from qwen_vllm.plugin import lm_head
from qwen_vllm.plugin.checkpoint import check_weight_shape
from qwen_vllm.plugin.long_context import encoded_positions, install_long_context
from qwen_vllm.plugin.quantization import QWenWeightsMapper
from qwen_vllm.plugin.weights import lora_packed_modules, vllm_mapper_fields
from qwen_vllm.runtime.processes import release_freed_memory, resident_bytes

logger = init_logger(f"vllm.{__name__}")  # vLLM's log handler and format

# Qwen v1 names -> vLLM's (plugin/weights.py); QWenWeightsMapper also names the
# GPTQ modules for vLLM's quantization config (see plugin/quantization.py).
QWEN_V1_TO_VLLM = QWenWeightsMapper(**vllm_mapper_fields())


def check_shapes(
    weights: Iterable[tuple[str, torch.Tensor]], config
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass weights through, raising a clear error on a shape that disagrees
    with config.json (vLLM's own message names only its internal parameter)."""
    cfg = config.to_dict()
    for name, tensor in weights:
        check_weight_shape(name, tuple(tensor.shape), cfg)
        yield name, tensor


def resident_model_gib(model: torch.nn.Module) -> float:
    """The host memory (GiB) a loaded :class:`QWenLMHeadModel` holds, as it
    measured it after loading; for ``LLM.apply_model`` (the bench asks each worker)."""
    return getattr(model, "resident_model_bytes", 0) / 2**30


class QWenLMHeadModel(Qwen2ForCausalLM, SupportsMRoPE):
    """Qwen v1 (``QWenLMHeadModel``) served by vLLM's Qwen2 implementation."""

    hf_to_vllm_mapper = QWEN_V1_TO_VLLM
    packed_modules_mapping = lora_packed_modules()  # LoRA: c_attn whole, w2/w1 as gate/up

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        resident_before = resident_bytes()
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Host memory the loaded model holds (set after loading; the bench reports it).
        self.resident_before, self.resident_model_bytes = resident_before, 0
        # Set by long_context.keep_prompt_alpha_on_resume while Model Runner V2
        # adds a request (its prefill may include output tokens on resume).
        self.prompt_len_for_positions: int | None = None
        self.long_context = install_long_context(self.model, vllm_config)
        lm_head.install(self, vllm_config)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """Per-request positions for dynamic NTK (called only when the config
        hook enabled vLLM's M-RoPE path, i.e. max_model_len > seq_length)."""
        return encoded_positions(self.long_context, input_tokens, mm_features, self.prompt_len_for_positions)

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every layer's own: return what
        loading freed to the OS (runtime/processes.release_freed_memory), then
        note how much host memory the model holds (all of it on CPU)."""
        from vllm.platforms import current_platform

        freed = release_freed_memory()
        self.resident_model_bytes = resident_bytes() - self.resident_before
        if current_platform.is_cpu():  # elsewhere the weights are in device memory
            logger.info(
                "the loaded model holds %.2f GiB of this process's memory (%.2f GiB that loading freed returned to the OS)",
                self.resident_model_bytes / 2**30, freed / 2**30,
            )  # fmt: skip

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(check_shapes(weights, self.config), mapper=self.hf_to_vllm_mapper)
