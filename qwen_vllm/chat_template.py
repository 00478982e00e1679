"""Qwen's ChatML context as token ids, built segment by segment like Qwen's make_context.

Layout (Qwen's make_context in its qwen_generation_utils.py)::

    <|im_start|>system\\n{system}<|im_end|>
    (\\n<|im_start|>{role}\\n{content}<|im_end|>)*
    \\n<|im_start|>assistant\\n

Roles and contents are encoded separately with ``allowed_special=set()``: text
a user typed never becomes a control token, and BPE merges never cross a
segment boundary (exactly Qwen's ids). ``CHATML_JINJA`` is the same layout as a
Jinja template for tools that only read templates; our tokenizer renders it
natively.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qwen_vllm.errors import QwenContextError, QwenRequestError
from qwen_vllm.tools.react import has_tool_history, react_messages

if TYPE_CHECKING:
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FRAME_JOINT = f"{IM_END}\n{IM_START}"
_CLOSED_TAIL = re.compile(re.escape(IM_END) + r"(\s*)\Z")
NL_ID = 198
ROLES = ("system", "user", "assistant")

CHATML_JINJA = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- elif not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)

History = Sequence[tuple[str, str]]


def encode_turn(tok: QWenTokenizer, role: str, content: str, *, close: bool = True) -> list[int]:
    """``<|im_start|>{role}\\n{content}<|im_end|>`` with role and content as plain text."""
    ids = [tok.im_start_id, *tok.encode_text(role, allowed_special=set()), NL_ID]
    ids += tok.encode_text(content, allowed_special=set())
    if close:
        ids.append(tok.im_end_id)
    return ids


def assistant_header(tok: QWenTokenizer) -> list[int]:
    """``\\n<|im_start|>assistant\\n``: where the model's reply starts."""
    return [NL_ID, tok.im_start_id, *tok.encode_text("assistant", allowed_special=set()), NL_ID]


def render_messages(
    tok: QWenTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    default_system: str = DEFAULT_SYSTEM,
) -> list[int]:
    """ChatML ids for OpenAI-style ``{"role", "content"}`` messages.

    A leading system message is added with ``default_system`` when the first
    message is not one (Qwen's behaviour). ``continue_final_message`` leaves the
    last message open so the model continues it.
    """
    if not messages:
        raise QwenRequestError("messages must not be empty")
    if add_generation_prompt and continue_final_message:
        raise QwenRequestError("add_generation_prompt and continue_final_message exclude each other")
    if not all(isinstance(m, Mapping) for m in messages):
        raise QwenRequestError("messages must be objects with 'role' and 'content'")
    turns = [dict(m) for m in messages]
    inserted = int(turns[0].get("role") != "system")
    if inserted:
        turns.insert(0, {"role": "system", "content": default_system})
    ids: list[int] = []
    for i, msg in enumerate(turns):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise QwenRequestError(
                f"messages[{i - inserted}]: role {role!r} is not supported; use {', '.join(ROLES)} "
                "(tool and function results go with tools)"
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise QwenRequestError(f"messages[{i - inserted}]: 'content' must be a string, got {type(content).__name__}")
        if i:
            ids.append(NL_ID)
        last = i == len(turns) - 1
        ids += encode_turn(tok, role, content, close=not (last and continue_final_message))
    if add_generation_prompt:
        ids += assistant_header(tok)
    return ids


def render_chat(
    tok: QWenTokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> tuple[list[int], bool]:
    """(ids, continued) for an OpenAI chat request: THE renderer of vLLM's
    chat endpoint (through the tokenizer) and of the wrapper's tool turns.

    Tools, or tool calls or results in the history, switch to Qwen's ReAct
    prompt (``qwen_vllm.tools.react``); ``continued`` is True when that leaves
    the last assistant turn open for the model to continue.
    """
    messages = list(messages)
    if tools or has_tool_history(messages):
        messages, continued = react_messages(messages, tools)
        if continued:
            add_generation_prompt, continue_final_message = False, True
    else:
        continued = continue_final_message
    ids = render_messages(
        tok, messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
    )
    return ids, continued


def make_context(
    tok: QWenTokenizer,
    query: str,
    history: History = (),
    system: str = DEFAULT_SYSTEM,
    *,
    max_window_size: int | None = None,
    max_model_len: int | None = None,
    max_new_tokens: int = 0,
) -> tuple[list[int], int]:
    """Qwen's make_context: (context ids, number of history turns kept).

    History is dropped oldest-first until the whole prompt (system, kept turns,
    query and assistant header) fits ``max_window_size`` and the prompt plus
    ``max_new_tokens`` fits ``max_model_len``. Unlike Qwen's original, the query
    and header are counted, so the result always fits.
    """
    system_ids = encode_turn(tok, "system", system)
    query_ids = [NL_ID, *encode_turn(tok, "user", query), *assistant_header(tok)]
    limits = []
    if max_window_size is not None:
        limits.append(("max_window_size", max_window_size))
    if max_model_len is not None:
        limits.append(("max_model_len - max_new_tokens", max_model_len - max_new_tokens))
    budget = min((n for _, n in limits), default=None)
    fixed = len(system_ids) + len(query_ids)
    if budget is not None and fixed > budget:
        name = min(limits, key=lambda kv: kv[1])[0]
        raise QwenContextError(
            f"the prompt needs {fixed} tokens (system {len(system_ids)}, query and header "
            f"{len(query_ids)}) but {name} allows {budget}"
            + (f" (max_model_len {max_model_len}, max_new_tokens {max_new_tokens})" if max_model_len else "")
        )
    kept: list[int] = []
    turns_kept = 0
    for turn_query, turn_response in reversed(list(history)):
        turn = [NL_ID, *encode_turn(tok, "user", turn_query), NL_ID, *encode_turn(tok, "assistant", turn_response)]
        if budget is not None and fixed + len(kept) + len(turn) > budget:
            break
        kept = turn + kept
        turns_kept += 1
    return system_ids + kept + query_ids, turns_kept


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


def prompt_string_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids for a prompt string already rendered as ChatML (FastChat's
    worker API).

    Prompt strings and special tokens: FastChat renders the conversation into one
    string, so control tokens and user text arrive mixed. This
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


class RenderedChat(str):
    """A rendered ChatML prompt that remembers its token ids.

    vLLM's chat endpoint asks the tokenizer for the prompt as *text*
    (``tokenize=False``) and tokenizes that text in a second step. Re-encoding
    would parse ``<|im_start|>`` typed by a user as a control token and could
    merge BPE across segment boundaries; QWenTokenizer instead returns
    ``token_ids`` when asked to encode a RenderedChat, so the engine gets
    exactly the ids rendered here. Any other string (a raw /v1/completions
    prompt) is encoded as Qwen's tokenizer does, special-token text included.
    """

    token_ids: tuple[int, ...]

    def __new__(cls, text: str, token_ids: Sequence[int]) -> RenderedChat:
        obj = super().__new__(cls, text)
        obj.token_ids = tuple(token_ids)
        return obj

    def __reduce__(self) -> tuple[type, tuple[str, tuple[int, ...]]]:
        # Pickle and deepcopy keep the ids (str's own reduce would drop them).
        return RenderedChat, (str(self), self.token_ids)


def apply_chat_template(
    tok: QWenTokenizer,
    conversation: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    tokenize: bool = True,
    return_dict: bool = True,
    **_: Any,
) -> Any:
    """transformers' ``apply_chat_template`` contract, rendered natively.

    ``tokenize=False`` returns a RenderedChat (a str carrying the ids).
    """
    ids, _ = render_chat(
        tok,
        conversation,
        tools,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=bool(continue_final_message),
    )
    if not tokenize:
        return RenderedChat(tok.decode(ids), ids)
    if return_dict:
        from transformers import BatchEncoding

        return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return ids
