"""``vLLMWrapper``: transformers' ``model.chat()`` on vLLM's engine (chat,
streaming, batching, Qwen's ReAct tools)."""

from qwen_vllm.wrapper.chat import vLLMWrapper

__all__ = ["vLLMWrapper"]
