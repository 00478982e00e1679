"""vLLM's config hook for ``QWenLMHeadModel`` (registered in vLLM's
``MODELS_CONFIG_MAP`` by ``qwen_vllm.register``; vLLM allows one per
architecture): the engine-wide half of Qwen's long context (see
``qwen_vllm.plugin.long_context`` for the model half) and the GPTQ / KV-cache checks
(``qwen_vllm.plugin.quantization.check_vllm_config``), so ``vllm.LLM`` and
``vllm serve`` fail clearly before any engine process starts.

vLLM runs it while building its config, in the process that builds it; the
result travels to the engine core and workers inside the config.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from qwen_vllm.plugin.ntk import LongContextFlags, LongContextPlan
from qwen_vllm.plugin.quantization import check_vllm_config

logger = init_logger(f"vllm.{__name__}")  # vLLM's log handler and format


class QWenEngineConfig(VerifyAndUpdateConfig):
    """vLLM's config hook for ``QWenLMHeadModel`` (``MODELS_CONFIG_MAP``)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        """Runs after vLLM resolved max_model_len against the config's
        ``model_max_length`` (QWenConfig sets it to the supported maximum)."""
        hf_config = model_config.hf_config
        flags = LongContextFlags.of(hf_config)
        # Also when VLLM_ALLOW_LONG_MAX_MODEL_LEN let vLLM's own check pass.
        flags.check_max_model_len(model_config.max_model_len)
        if model_config.original_max_model_len is None and model_config.max_model_len > flags.seq_length:
            # Not asked for: Qwen's trained length, as before long context existed.
            model_config.max_model_len = flags.seq_length
        plan = LongContextPlan.of(hf_config, model_config.max_model_len)
        if plan is not None and plan.encodes_positions:
            # vLLM's M-RoPE path carries a per-request position offset; every
            # rotary frequency follows the first position row.
            hf_config.mrope_section = [hf_config.head_dim // 2, 0, 0]
        elif hasattr(hf_config, "mrope_section"):
            del hf_config.mrope_section

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_vllm_config(vllm_config)
        model_config = vllm_config.model_config
        plan = LongContextPlan.of(model_config.hf_config, model_config.max_model_len)
        cache_config = vllm_config.cache_config
        if plan is not None and plan.encodes_positions and cache_config.enable_prefix_caching:
            logger.warning(
                "Qwen long context: prefix caching disabled. With max_model_len=%d > seq_length=%d "
                "each request's K/V depend on its prompt-length NTK alpha, which vLLM's block "
                "hashes do not see; serve with max_model_len <= %d to keep prefix caching.",
                model_config.max_model_len,
                plan.seq_length,
                plan.seq_length,
            )
            cache_config.enable_prefix_caching = False
