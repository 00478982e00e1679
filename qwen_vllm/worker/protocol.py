"""FastChat's worker protocol (fschat 0.2.36) mapped onto vLLM: no HTTP here.

What a FastChat client sends to ``/worker_generate_stream`` ("gen params":
an already rendered ``prompt`` string plus sampling fields) becomes prompt
token ids and ``SamplingParams``; each ``RequestOutput`` becomes one FastChat
chunk (cumulative ``text``, ``error_code``, ``usage``, ``finish_reason``).
Errors travel in-band as FastChat does: ``{"text": message, "error_code": N}``
with HTTP 200, so FastChat's own clients show the message.

Differences from fschat's vllm_worker (fastchat/serve/vllm_worker.py), on purpose:
``top_k`` may be omitted or an integral float; ``repetition_penalty``,
``seed``, ``n`` and ``logprobs`` are honoured; ChatML stop ids always apply to
a chat checkpoint whatever its path is called; the final chunk is sent once;
defaults for omitted fields come from the checkpoint's generation_config (as
on vLLM's /v1 routes), not from FastChat's neutral ones.

Prompt strings become ids in ``chat_template.prompt_string_ids`` (the one
ChatML renderer).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vllm.exceptions import VLLMClientError

from qwen_vllm.errors import QwenRequestError
from qwen_vllm.settings import SETTINGS, merge_generation, to_sampling_params

if TYPE_CHECKING:
    from vllm import CompletionOutput, RequestOutput, SamplingParams

# FastChat's ErrorCode values (fastchat/constants.py), the ones a worker sends.
VALIDATION_TYPE_ERROR = 40001
PARAM_OUT_OF_RANGE = 40302
CONTEXT_OVERFLOW = 40303
ENGINE_OVERLOADED = 42903  # the worker's queue is full (admission.py)
INTERNAL_ERROR = 50001

# FastChat gen params that are rows of the settings table (HF generation names).
_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
_COUNTS = ("n", "logprobs", "best_of")  # FastChat's own integer fields


class WorkerRequestError(QwenRequestError):
    """A FastChat gen-params request is invalid; ``code`` is FastChat's ErrorCode."""

    def __init__(self, message: str, code: int = PARAM_OUT_OF_RANGE) -> None:
        super().__init__(message)
        self.code = code


def error_chunk(message: str, code: int) -> dict[str, Any]:
    """FastChat's in-band error: clients show ``text`` and check ``error_code``."""
    return {"text": message, "error_code": code}


def frame(data: dict[str, Any]) -> bytes:
    """One chunk of ``/worker_generate_stream``: JSON ended by a NUL byte."""
    return json.dumps(data).encode() + b"\0"


def conv_template(name: str) -> dict[str, Any]:
    """FastChat's Conversation ``name`` as its worker sends it (sep_style as int)."""
    from fastchat.conversation import conv_templates, get_conv_template

    if name not in conv_templates:
        raise QwenRequestError(
            f"unknown FastChat conversation template {name!r}; Qwen chat models use 'qwen-7b-chat'"
        )
    conv = dataclasses.asdict(get_conv_template(name))
    conv["sep_style"] = int(conv["sep_style"])
    return conv


def default_conv_template(chat_format: str) -> str:
    """Qwen's template for ChatML checkpoints whatever their path is called."""
    return "qwen-7b-chat" if chat_format == "chatml" else "raw"


# -- gen params -> SamplingParams ---------------------------------------------------


def _checked(params: Mapping[str, Any], key: str) -> Any:
    """params[key] if it has the right type (None when absent)."""
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkerRequestError(f"{key} must be a number, got {value!r}", VALIDATION_TYPE_ERROR)
    if key in _COUNTS or SETTINGS[key].kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise WorkerRequestError(f"{key} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None or stop == "":
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise WorkerRequestError(f"stop must be a string or a list of strings, got {stop!r}", VALIDATION_TYPE_ERROR)


def _stop_ids(ids: Any) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return list(ids)
    raise WorkerRequestError(f"stop_token_ids must be a list of integers, got {ids!r}", VALIDATION_TYPE_ERROR)


def sampling_params(
    params: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    prompt_len: int,
    max_model_len: int,
    max_n: int | None = None,
) -> SamplingParams:
    """SamplingParams for FastChat gen params.

    ``defaults`` are the checkpoint's generation settings (HF names, e.g. from
    vLLM's ``get_diff_sampling_param``); fields the request sets win.
    FastChat's conventions kept: temperature in [0, 1e-5] means greedy (below 0 is an error), top_p is
    floored at 1e-5, and max_new_tokens is clamped to what the context has left.
    """
    if params.get("images"):
        raise WorkerRequestError("images are not supported: this worker serves Qwen (v1) text chat models")
    if params.get("use_beam_search"):
        raise WorkerRequestError(
            "use_beam_search is not supported on the FastChat worker route; "
            "use the worker's /v1/completions with use_beam_search"
        )
    n = _checked(params, "n")
    n = 1 if n is None else n
    if max_n is not None and n > max_n:
        raise WorkerRequestError(f"n={n} is more than the {max_n} sequences this worker runs at once (--max-num-seqs)")
    best_of = _checked(params, "best_of")
    if best_of is not None and best_of != n:
        raise WorkerRequestError(f"best_of={best_of} is not supported: vLLM's V1 engine has no best_of (only best_of == n)")
    overrides = {k: _checked(params, k) for k in _SAMPLING_KEYS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    temperature = overrides.get("temperature")
    if temperature is not None and temperature < 0:
        raise WorkerRequestError(f"temperature must be non-negative, got {temperature}")
    if temperature is not None and temperature <= 1e-5:
        overrides["do_sample"] = False
    elif temperature is not None:
        overrides["do_sample"] = True
    if "top_p" in overrides:
        overrides["top_p"] = max(overrides["top_p"], 1e-5)
    room = max_model_len - prompt_len
    if room <= 0:
        raise WorkerRequestError(
            f"the prompt has {prompt_len} tokens but the model's context is {max_model_len} tokens",
            CONTEXT_OVERFLOW,
        )
    try:
        gen = merge_generation(defaults, None, overrides)
    except QwenRequestError as exc:
        raise WorkerRequestError(str(exc)) from exc
    gen["max_new_tokens"] = min(gen.get("max_new_tokens") or room, room)
    logprobs = _checked(params, "logprobs")
    echo = bool(params.get("echo", True))
    # ChatML stops need nothing here: they are the engine's default stops (plugin/chatml_eos.py).
    stop_ids = _stop_ids(params.get("stop_token_ids"))
    stop = _stop_strings(params.get("stop"))
    try:
        return to_sampling_params(
            gen,
            stop_token_ids=stop_ids,
            stop=stop,
            n=n,
            logprobs=logprobs,
            prompt_logprobs=logprobs if echo and logprobs is not None else None,
        )
    except (QwenRequestError, VLLMClientError) as exc:
        # to_sampling_params lets vLLM's own VLLMValidationError (not a ValueError) through.
        raise WorkerRequestError(str(exc)) from exc


# -- RequestOutput -> chunk ----------------------------------------------------------


class ChunkBuilder:
    """Turns one request's RequestOutputs into FastChat chunks.

    A chunk holds the cumulative text of sequence 0 (prompt first when echo),
    usage and finish_reason; with n > 1 also ``choices`` (every sequence's
    text and finish_reason). vLLM streams each of n sequences in its own
    RequestOutput, so the latest output per sequence is kept here.
    """

    def __init__(
        self, prompt: str, prompt_ids: list[int], *, n: int, echo: bool, logprobs: int | None, first_token: str = ""
    ) -> None:
        self.n = n
        self.prefix = prompt if echo else ""
        self.prompt_ids = prompt_ids
        self.echo = echo
        self.logprobs = logprobs
        self.first_token = first_token
        self.latest: dict[int, CompletionOutput] = {}
        self.prompt_logprobs: Any = None

    def update(self, out: RequestOutput) -> dict[str, Any] | None:
        """The chunk after ``out``, or None while sequence 0 has produced nothing."""
        for o in out.outputs:
            self.latest[o.index] = o
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if 0 not in self.latest:
            return None
        outputs = [self.latest[i] for i in sorted(self.latest)]
        first = self.latest[0]
        prompt_tokens = len(self.prompt_ids)
        completion_tokens = sum(len(o.token_ids) for o in outputs)
        data: dict[str, Any] = {
            "text": self.prefix + first.text,
            "error_code": 0,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "cumulative_logprob": [o.cumulative_logprob for o in outputs],
            "finish_reason": first.finish_reason if out.finished else None,
        }
        if self.n > 1:
            data["choices"] = [
                {"index": o.index, "text": self.prefix + o.text, "finish_reason": o.finish_reason} for o in outputs
            ]
        if self.logprobs is not None:
            data["logprobs"] = self._logprobs(first)
        return data

    def _logprobs(self, completion: CompletionOutput) -> dict[str, list]:
        """FastChat/OpenAI-completions logprobs of sequence 0 (prompt first when echo)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float]] = []

        def add(token_id: int, position: Mapping[int, Any] | None, fallback: str) -> None:
            chosen = position.get(token_id) if position else None
            decoded = chosen.decoded_token if chosen is not None else None
            tokens.append(decoded if decoded is not None else fallback)
            token_logprobs.append(chosen.logprob if chosen is not None else None)
            top_logprobs.append(
                {
                    lp.decoded_token: lp.logprob
                    for lp in (position or {}).values()
                    if lp.rank is not None and lp.rank <= self.logprobs and lp.decoded_token is not None
                }
            )

        if self.echo and self.prompt_logprobs is not None:
            for i, (token_id, position) in enumerate(zip(self.prompt_ids, self.prompt_logprobs)):
                add(token_id, position, self.first_token if i == 0 else "")
        for token_id, position in zip(completion.token_ids, completion.logprobs or []):
            add(token_id, position, "")
        offsets, pos = [], 0
        for token in tokens:
            offsets.append(pos)
            pos += len(token)
        return {"text_offset": offsets, "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs}
