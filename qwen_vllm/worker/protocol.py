"""FastChat's worker protocol (fschat 0.2.36) mapped onto vLLM: no HTTP here.

What a FastChat client sends to ``/worker_generate_stream`` ("gen params":
an already rendered ``prompt`` string plus sampling fields) becomes prompt
token ids and ``SamplingParams``; each ``RequestOutput`` becomes one FastChat
chunk (cumulative ``text``, ``error_code``, ``usage``, ``finish_reason``).
Errors travel in-band as FastChat does: ``{"text": message, "error_code": N}``
with HTTP 200, so FastChat's own clients show the message.

Differences from fschat's vllm_worker, on purpose (fastchat-anchor.md §2):
``top_k`` may be omitted or an integral float; ``repetition_penalty``,
``seed``, ``n`` and ``logprobs`` are honoured; ChatML stop ids always apply to
a chat checkpoint whatever its path is called; the final chunk is sent once;
defaults for omitted fields come from the checkpoint's generation_config (as
on vLLM's /v1 routes), not from FastChat's neutral ones.

Prompt strings and special tokens: FastChat renders the conversation into one
string, so control tokens and user text arrive mixed. ``prompt_token_ids``
parses the ChatML frame structure instead of tokenizing with every special
token allowed: ``<|im_start|>`` and ``<|im_end|>`` become control tokens only
where they open or close a frame (prompt start, the ``<|im_end|>\\n<|im_start|>``
joints, a closing ``<|im_end|>`` at the end); every other occurrence of
special-token text (``<|endoftext|>``, ``<|extra_0|>``, a stray
``<|im_start|>`` inside a message) stays plain text. Roles and contents are
encoded segment by segment, giving exactly Qwen's make_context ids. A message
that itself contains the full joint ``<|im_end|>\\n<|im_start|>`` cannot be told
apart from a real frame in a flat string; the OpenAI routes (messages, not
strings) have no such ambiguity.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vllm.exceptions import VLLMClientError

from qwen_vllm.chat_template import NL_ID, encode_turn
from qwen_vllm.errors import QwenRequestError
from qwen_vllm.sampling import merge_generation, to_sampling_params
from qwen_vllm.stop_words import stop_ids_for

if TYPE_CHECKING:
    from vllm import CompletionOutput, RequestOutput, SamplingParams

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FRAME_JOINT = f"{IM_END}\n{IM_START}"
_CLOSED_TAIL = re.compile(re.escape(IM_END) + r"(\s*)\Z")

# FastChat's ErrorCode values (fastchat/constants.py), the ones a worker sends.
VALIDATION_TYPE_ERROR = 40001
PARAM_OUT_OF_RANGE = 40302
CONTEXT_OVERFLOW = 40303
INTERNAL_ERROR = 50001

# Gen-param name -> key understood by qwen_vllm.sampling (HF generation names).
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
_INT_KEYS = {"top_k", "max_new_tokens", "seed", "n", "logprobs", "best_of"}


class WorkerRequestError(QwenRequestError):
    """A FastChat gen-params request is invalid; ``code`` is FastChat's ErrorCode."""

    def __init__(self, message: str, code: int = PARAM_OUT_OF_RANGE) -> None:
        super().__init__(message)
        self.code = code


def error_chunk(message: str, code: int) -> dict[str, Any]:
    """FastChat's in-band error: clients show ``text`` and check ``error_code``."""
    return {"text": message, "error_code": code}


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


# -- prompt string -> ids ------------------------------------------------------


def chatml_frames(prompt: str) -> tuple[list[tuple[str, bool]], str] | None:
    """(frames, tail) of a rendered ChatML prompt, or None if it is not one.

    Each frame is (text after ``<|im_start|>``, closed); ``tail`` is text after
    a final closing ``<|im_end|>`` (e.g. a trailing newline).
    """
    if not prompt.startswith(IM_START):
        return None
    pieces = prompt[len(IM_START) :].split(FRAME_JOINT)
    frames = [(piece, True) for piece in pieces[:-1]]
    last, tail = pieces[-1], ""
    closed = _CLOSED_TAIL.search(last)
    if closed:
        last, tail = last[: closed.start()], closed.group(1)
    frames.append((last, bool(closed)))
    return frames, tail


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids for a FastChat prompt string (see the module docstring)."""
    if not hasattr(tokenizer, "encode_text"):
        # Not Qwen v1's tokenizer (e.g. a checkpoint converted to Qwen2):
        # tokenize as fschat's vllm_worker did.
        return tokenizer.encode(prompt, add_special_tokens=False)
    parsed = chatml_frames(prompt)
    if parsed is None:
        return tokenizer.encode_text(prompt, allowed_special=set())
    frames, tail = parsed
    ids: list[int] = []
    for i, (frame, closed) in enumerate(frames):
        if i:
            ids.append(NL_ID)
        role, newline, content = frame.partition("\n")
        if newline:
            ids += encode_turn(tokenizer, role, content, close=closed)
        else:  # "<|im_start|>assistant" with no newline yet
            ids += [tokenizer.im_start_id, *tokenizer.encode_text(frame, allowed_special=set())]
            if closed:
                ids.append(tokenizer.im_end_id)
    return ids + tokenizer.encode_text(tail, allowed_special=set())


# -- gen params -> SamplingParams ---------------------------------------------------


def _checked(params: Mapping[str, Any], key: str) -> Any:
    """params[key] if it has the right type (None when absent)."""
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkerRequestError(f"{key} must be a number, got {value!r}", VALIDATION_TYPE_ERROR)
    if key in _INT_KEYS:
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
    chat_format: str,
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
    gen = merge_generation(defaults, None, overrides)
    if gen.get("max_new_tokens") is not None and gen["max_new_tokens"] < 1:
        raise WorkerRequestError(f"max_new_tokens must be at least 1, got {gen['max_new_tokens']}")
    gen["max_new_tokens"] = min(gen.get("max_new_tokens") or room, room)
    logprobs = _checked(params, "logprobs")
    echo = bool(params.get("echo", True))
    stop_ids = stop_ids_for(chat_format)
    stop_ids += [i for i in _stop_ids(params.get("stop_token_ids")) if i not in stop_ids]
    stop = _stop_strings(params.get("stop"))
    try:
        return to_sampling_params(
            gen,
            stop_token_ids=stop_ids,
            stop=stop,
            n=n,
            min_p=defaults.get("min_p", 0.0),  # a generation_config default merge_generation does not carry
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
