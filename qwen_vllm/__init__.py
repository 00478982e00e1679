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
    from qwen_vllm.wrapper import vLLMWrapper

_registered = False


def register() -> None:
    """Teach vLLM and transformers about Qwen v1 (config, model, tokenizer)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig
    from transformers.models.auto import tokenization_auto
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils import config as vllm_config

    from qwen_vllm.config import QWenConfig
    from qwen_vllm.long_context_config import QwenLongContextConfig
    from qwen_vllm.tokenizer import QWenTokenizer

    vllm_config._CONFIG_REGISTRY[QWenConfig.model_type] = QWenConfig
    AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
    # By name only: registering it against QWenConfig would let a checkpoint's
    # tokenization_qwen.py win when trust_remote_code=True.
    tokenization_auto.REGISTERED_TOKENIZER_CLASSES["QWenTokenizer"] = QWenTokenizer
    if "QWenLMHeadModel" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("QWenLMHeadModel", "qwen_vllm.model:QWenLMHeadModel")
    # Per-engine long-context set-up (max_model_len default, M-RoPE positions,
    # prefix caching): vLLM runs this hook while building its config.
    MODELS_CONFIG_MAP["QWenLMHeadModel"] = QwenLongContextConfig
    _registered = True


def __getattr__(name: str):
    if name == "vLLMWrapper":
        from qwen_vllm.wrapper import vLLMWrapper

        return vLLMWrapper
    raise AttributeError(name)
