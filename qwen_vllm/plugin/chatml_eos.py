"""All ChatML stop ids as vLLM's default stops for Qwen v1 chat checkpoints.

Qwen's chats end a turn with ``<|im_end|>``; Qwen's own code also stops on
``<|im_start|>`` and ``<|endoftext|>`` (stop_words.CHATML_STOP_IDS). With no
flags vLLM 0.32 stops on the tokenizer's eos (``<|im_end|>``, 151645) and on
generation_config.json's ``eos_token_id`` (``<|endoftext|>``, 151643) —
``<|im_start|>`` (151644) is not a stop, and vLLM offers no hook to add a
default stop id per model: it reads the extra eos ids only from
generation_config.json (``ModelConfig.try_get_generation_config`` ->
``InputProcessor`` -> ``SamplingParams.update_from_generation_config``),
which is the user's file.

So, as the one patch of vLLM in this package, ``install()`` wraps
``ModelConfig.try_get_generation_config`` to report every ChatML stop id as
``eos_token_id`` for Qwen v1 chat checkpoints (``model_type "qwen"``,
``chat_format "chatml"``); vLLM's own machinery then adds them to every
request's stop ids (chat, completions, vLLMWrapper, the FastChat worker).
Other models and Qwen base models (``chat_format "raw"``) are untouched;
``ignore_eos=True`` still disables them. tests/test_tool_parser.py fails
loudly if the wrapped method moves.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from qwen_vllm.stop_words import CHATML_STOP_IDS

_MARK = "_qwen_vllm_chatml_eos"


def chatml_eos_fields(fields: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
    """generation_config fields with all ChatML stop ids in ``eos_token_id``
    (only for Qwen v1 chat checkpoints)."""
    fields = dict(fields)
    if model_type != "qwen" or fields.get("chat_format", "chatml") != "chatml":
        return fields
    eos = fields.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    fields["eos_token_id"] = list(dict.fromkeys([*ids, *CHATML_STOP_IDS]))
    return fields


def install() -> None:
    """Wrap vLLM's ModelConfig.try_get_generation_config (idempotent)."""
    from vllm.config.model import ModelConfig

    original = ModelConfig.try_get_generation_config
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def try_get_generation_config(self: ModelConfig) -> dict[str, Any]:
        return chatml_eos_fields(original(self), getattr(self.hf_config, "model_type", None))

    setattr(try_get_generation_config, _MARK, True)
    ModelConfig.try_get_generation_config = try_get_generation_config


def installed() -> bool:
    from vllm.config.model import ModelConfig

    return bool(getattr(ModelConfig.try_get_generation_config, _MARK, False))
