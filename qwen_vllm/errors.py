"""Typed errors: each names the file, field or length that is wrong."""


class QwenVLLMError(Exception):
    """Base class for every error qwen-vllm raises on purpose."""


class QwenCheckpointError(QwenVLLMError, ValueError):
    """A Qwen checkpoint directory is incomplete or inconsistent."""


class QwenRequestError(QwenVLLMError, ValueError):
    """A request (messages, sampling or generation arguments) is invalid."""


class QwenContextError(QwenRequestError):
    """A prompt does not fit the context window; the message names both lengths."""


class QwenSettingsError(QwenVLLMError, ValueError):
    """Engine settings this machine cannot honour (e.g. more tensor-parallel
    ranks than CPU cores); the message names the limit."""


class QwenQuantizationError(QwenVLLMError, ValueError):
    """A quantized checkpoint or KV-cache dtype cannot run on this hardware or
    tensor-parallel size; the message names what can."""


class QwenAdapterError(QwenCheckpointError):
    """A LoRA adapter does not fit its base checkpoint (names, shapes, targets)
    or cannot be merged into it; the message names both sides."""
