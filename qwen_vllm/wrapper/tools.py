"""Qwen's ReAct tool calling on ``vLLMWrapper`` (no server): the same prompt
ids as vLLM's server builds for the request (one renderer,
``chat_template.render_chat``) and the same reply parser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwen_vllm.chat_template import render_chat
from qwen_vllm.tools.react import (
    REACT_STOP_WORDS,
    ReactReply,
    parse_react,
    tool_choice_name,
    tool_specs,
)
from qwen_vllm.wrapper.chat import vLLMWrapper


def chat_with_tools(
    model: vLLMWrapper,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    tool_choice: Any = "auto",
    generation_config: Any = None,
    stop_words_ids: Sequence[Any] | None = None,
    **gen_kwargs: Any,
) -> ReactReply:
    """One assistant turn of a tool conversation on ``vLLMWrapper`` (no server).

    ``messages`` and ``tools`` are OpenAI's; append ``reply.message`` and a
    ``{"role": "tool", "tool_call_id": ..., "content": ...}`` result, then call
    again for the final answer. The prompt (and its token ids) are exactly what
    vLLM's server builds for the same request; "Observation:" is added to the
    stop words; ``tool_choice="none"`` leaves the tools out of the prompt.
    """
    if tool_choice == "none":
        tools = None
    specs = tool_specs(tools)
    only = tool_choice_name(tool_choice, specs)
    prompt, open_final = render_chat(model.tokenizer, messages, tools)
    text = model.chat_ids(prompt, generation_config, [*REACT_STOP_WORDS, *(stop_words_ids or ())], **gen_kwargs)
    if not specs:
        return ReactReply(text)
    return parse_react(text, specs, continuation=open_final, only=only)
