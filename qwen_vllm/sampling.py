"""transformers-style generation settings -> vLLM SamplingParams.

Qwen's generation_config.json supplies the defaults (top_p 0.8, top_k 0,
repetition_penalty 1.1, max_new_tokens 512, do_sample true); a call's
``generation_config`` and keyword arguments override them, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError

from qwen_vllm.errors import QwenRequestError

# HF generation keys we honour -> how they reach SamplingParams.
GENERATION_KEYS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_window_size",
)


INT_KEYS = frozenset({"max_new_tokens", "min_new_tokens", "top_k", "seed", "max_window_size"})


def _check_type(key: str, value: Any) -> None:
    """Numbers must be numbers (ints where counted): a string or a list would
    otherwise fail deep in vLLM or in context arithmetic with a bare TypeError."""
    if value is None:
        return
    if key == "do_sample":
        if not isinstance(value, bool):
            raise QwenRequestError(f"do_sample must be true or false, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QwenRequestError(f"{key} must be a number, got {value!r}")
    if key in INT_KEYS and not float(value).is_integer():
        raise QwenRequestError(f"{key} must be an integer, got {value!r}")


def merge_generation(
    defaults: Mapping[str, Any],
    generation_config: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """defaults < generation_config (dict or transformers GenerationConfig) < overrides."""
    merged = {k: v for k, v in defaults.items() if k in GENERATION_KEYS}
    if generation_config is not None:
        if isinstance(generation_config, Mapping):
            gc = generation_config
        elif callable(getattr(generation_config, "to_dict", None)):
            gc = generation_config.to_dict()
        else:
            raise QwenRequestError(
                f"generation_config must be a dict or a transformers GenerationConfig, got {type(generation_config).__name__}"
            )
        merged.update({k: v for k, v in gc.items() if k in GENERATION_KEYS and v is not None})
    for key, value in (overrides or {}).items():
        if key not in GENERATION_KEYS:
            raise TypeError(
                f"unknown generation argument {key!r}; supported: {', '.join(GENERATION_KEYS)} and stop_words_ids"
            )
        merged[key] = value
    for key, value in merged.items():
        _check_type(key, value)
    return merged


def to_sampling_params(
    gen: Mapping[str, Any],
    *,
    stop_token_ids: list[int],
    stop: list[str],
    n: int = 1,
    **extra: Any,
) -> SamplingParams:
    """SamplingParams for merged generation settings; invalid values raise
    QwenRequestError naming the setting."""
    do_sample = gen.get("do_sample", True)
    temperature = gen.get("temperature", 1.0) if do_sample else 0.0
    top_k = gen.get("top_k", 0)
    if isinstance(top_k, float) and top_k.is_integer():
        top_k = int(top_k)
    kwargs = dict(
        n=n,
        temperature=temperature,
        top_p=gen.get("top_p", 1.0) if do_sample else 1.0,
        top_k=top_k if do_sample else 0,
        repetition_penalty=gen.get("repetition_penalty", 1.0),
        presence_penalty=gen.get("presence_penalty", 0.0),
        frequency_penalty=gen.get("frequency_penalty", 0.0),
        max_tokens=gen.get("max_new_tokens", 512),
        min_tokens=gen.get("min_new_tokens", 0),
        seed=gen.get("seed"),
        stop_token_ids=stop_token_ids,
        stop=stop,
        skip_special_tokens=True,
        **extra,
    )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise QwenRequestError(f"invalid generation settings: {exc}") from exc
