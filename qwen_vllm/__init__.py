"""qwen-vllm: serve Qwen (v1) chat models on current vLLM.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts (API server, engine core, each worker, the model
inspection subprocess), so it is idempotent and cheap: the model class is
registered as a lazy "module:Class" string.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["register", "vLLMWrapper", "__version__"]

if TYPE_CHECKING:
    from qwen_vllm.wrapper import vLLMWrapper

_registered = False

# Set by interactive front ends that run an engine in their own process
# (``qwen-vllm chat --model``). Ctrl-C in a terminal signals the whole
# foreground process group, and vLLM's engine core and workers shut down on
# SIGINT; with this set, each process vLLM spawns moves to a process group of
# its own when it loads this plugin, so Ctrl-C reaches only the front end.
# (A blocked or ignored SIGINT does not survive: spawn resets the mask and
# vLLM installs its own handler.)
OWN_PROCESS_GROUP_ENV = "QWEN_VLLM_ENGINE_OWN_PROCESS_GROUP"


def _leave_terminal_process_group() -> None:
    if os.environ.get(OWN_PROCESS_GROUP_ENV) == "1" and multiprocessing.parent_process() is not None:
        os.setpgid(0, 0)


def register() -> None:
    """Teach vLLM and transformers about Qwen v1 (config, model, tokenizer,
    tool parser, default ChatML stops, GPTQ checks, and the CPU Int4 kernel
    where vLLM's build lacks it)."""
    global _registered
    if _registered:
        return
    _leave_terminal_process_group()
    from qwen_vllm.process_tree import engine_process_dies_with_parent

    engine_process_dies_with_parent()
    from transformers import AutoConfig
    from transformers.models.auto import tokenization_auto
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils import config as vllm_config

    from qwen_vllm import cpu_gptq
    from qwen_vllm.config import QWenConfig
    from qwen_vllm.engine_config import QWenEngineConfig
    from qwen_vllm.tokenizer import QWenTokenizer

    vllm_config._CONFIG_REGISTRY[QWenConfig.model_type] = QWenConfig
    AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
    # By name only: registering it against QWenConfig would let a checkpoint's
    # tokenization_qwen.py win when trust_remote_code=True.
    tokenization_auto.REGISTERED_TOKENIZER_CLASSES["QWenTokenizer"] = QWenTokenizer
    if "QWenLMHeadModel" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("QWenLMHeadModel", "qwen_vllm.model:QWenLMHeadModel")
    # vLLM's per-architecture config hook: long-context set-up (max_model_len
    # default, M-RoPE positions, prefix caching) and GPTQ/KV-cache checks.
    MODELS_CONFIG_MAP["QWenLMHeadModel"] = QWenEngineConfig
    # GPTQ Int4 on CPUs whose vLLM build lacks the kernel (AVX2): a torch op.
    cpu_gptq.install()
    _register_serving()
    _registered = True


def _register_serving() -> None:
    """OpenAI-server pieces: the "qwen_react" tool parser (lazy: imported only
    when a server selects it) and every ChatML stop id as a default stop."""
    from vllm.tool_parsers import ToolParserManager

    from qwen_vllm import chatml_eos
    from qwen_vllm.function_call import PARSER_NAME

    ToolParserManager.register_lazy_module(PARSER_NAME, "qwen_vllm.tool_parser", "QwenReactToolParser")
    chatml_eos.install()


def __getattr__(name: str):
    if name == "vLLMWrapper":
        from qwen_vllm.wrapper import vLLMWrapper

        return vLLMWrapper
    raise AttributeError(name)
