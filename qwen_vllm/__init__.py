"""qwen-vllm: serve Qwen (v1) chat models on current vLLM.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts (API server, engine core, each worker, the model
inspection subprocess), so it is idempotent and cheap: the model class is
registered as a lazy "module:Class" string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["register", "vLLMWrapper", "__version__"]

if TYPE_CHECKING:
    from qwen_vllm.wrapper.chat import vLLMWrapper

_registered = False


def register() -> None:
    """Teach vLLM and transformers about Qwen v1 (config, model, tokenizer,
    tool parser, default ChatML stops, GPTQ checks, the CPU Int4 kernel
    where vLLM's build lacks it, and the CPU LoRA ops)."""
    global _registered
    if _registered:
        return
    # First: under fork, the children of this process inherit ``_registered``.
    from qwen_vllm.runtime.processes import install_process_hooks

    install_process_hooks()
    from transformers import AutoConfig
    from transformers.models.auto import tokenization_auto
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils import config as vllm_config

    from qwen_vllm.plugin import cpu_gptq, cpu_lora
    from qwen_vllm.plugin.config import QWenConfig
    from qwen_vllm.plugin.engine_config import QWenEngineConfig
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

    vllm_config._CONFIG_REGISTRY[QWenConfig.model_type] = QWenConfig
    AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
    # By name only: registering it against QWenConfig would let a checkpoint's
    # tokenization_qwen.py win when trust_remote_code=True.
    tokenization_auto.REGISTERED_TOKENIZER_CLASSES["QWenTokenizer"] = QWenTokenizer
    if "QWenLMHeadModel" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("QWenLMHeadModel", "qwen_vllm.plugin.model:QWenLMHeadModel")
    # vLLM's per-architecture config hook: long-context set-up (max_model_len
    # default, M-RoPE positions, prefix caching) and GPTQ/KV-cache checks.
    MODELS_CONFIG_MAP["QWenLMHeadModel"] = QWenEngineConfig
    # GPTQ Int4/Int8 on CPU: PyTorch's weight-only kernels, ahead of vLLM's CPUWNA16.
    cpu_gptq.install()
    # LoRA on CPU: base-model rows without the last slot's adapter, one matmul per adapter.
    cpu_lora.install()
    _register_serving()
    _registered = True


def _register_serving() -> None:
    """OpenAI-server pieces: the "qwen_react" tool parser (lazy: imported only
    when a server selects it) and every ChatML stop id as a default stop."""
    from vllm.tool_parsers import ToolParserManager

    from qwen_vllm.plugin import chatml_eos
    from qwen_vllm.tools.react import PARSER_NAME

    ToolParserManager.register_lazy_module(PARSER_NAME, "qwen_vllm.tools.vllm_parser", "QwenReactToolParser")
    chatml_eos.install()


def __getattr__(name: str):
    if name == "vLLMWrapper":
        from qwen_vllm.wrapper.chat import vLLMWrapper

        return vLLMWrapper
    raise AttributeError(name)
