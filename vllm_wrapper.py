"""Drop-in for Qwen's examples/vllm_wrapper.py: ``from vllm_wrapper import vLLMWrapper``."""

from qwen_vllm.wrapper.chat import vLLMWrapper

__all__ = ["vLLMWrapper"]
