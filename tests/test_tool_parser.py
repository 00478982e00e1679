"""The vLLM side of tool calling, in-process (no engine): registration, the
vLLM hooks it relies on (fail loudly if vLLM moves them), the parser inside
vLLM's own Parser composition, server flags, default ChatML stops."""

from __future__ import annotations

import inspect

import pytest
from react_cases import ARGS, THOUGHT, TIME, WEATHER

import qwen_vllm
from qwen_vllm.plugin import chatml_eos
from qwen_vllm.tools.vllm_parser import (
    LEGACY_MIDDLEWARE,
    SERVER_ARGS,
    SERVER_DEFAULTS,
    QwenReactToolParser,
    with_server_args,
)

qwen_vllm.register()


def test_registered_with_vllm() -> None:
    from vllm.tool_parsers import ToolParserManager

    assert ToolParserManager.get_tool_parser("qwen_react") is QwenReactToolParser
    assert chatml_eos.installed()


def test_vllm_hooks_still_exist() -> None:
    """vLLM internals the design depends on; if one moves, this names it."""
    from vllm.config.model import ModelConfig
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.parser.parser_manager import ParserManager
    from vllm.renderers import online_renderer
    from vllm.tool_parsers.abstract_tool_parser import ToolParser
    from vllm.v1.engine import input_processor

    assert hasattr(ToolParser, "engine_based_streaming") and hasattr(ToolParser, "supports_required_and_named")
    assert "finish_streaming" in inspect.getsource(DelegatingParser._flush_engine_parsers)
    assert "enable_auto_tools" in inspect.signature(ParserManager.get_parser).parameters
    # Chat prompts are rendered as text (tokenize=False) and tokenized afterwards:
    # the reason for chat_template.RenderedChat.
    assert "tokenize=(" in inspect.getsource(online_renderer.OnlineRenderer.preprocess_chat)
    # Extra eos ids come only from the generation config, via this method.
    assert "try_get_generation_config" in inspect.getsource(input_processor)
    assert callable(ModelConfig.try_get_generation_config)


def test_chatml_eos_fields() -> None:
    from vllm import SamplingParams

    fields = chatml_eos.chatml_eos_fields({"eos_token_id": 151643, "chat_format": "chatml"}, "qwen")
    assert fields["eos_token_id"] == [151643, 151645, 151644]
    params = SamplingParams()
    params.update_from_generation_config(fields, 151645)  # what vLLM's InputProcessor does
    assert set(params.stop_token_ids) == {151643, 151644}
    assert params.eos_token_id == 151645
    base = {"eos_token_id": 151643, "chat_format": "raw"}
    assert chatml_eos.chatml_eos_fields(base, "qwen") == base
    assert chatml_eos.chatml_eos_fields({"eos_token_id": 2}, "llama") == {"eos_token_id": 2}


def test_server_args() -> None:
    assert with_server_args(["--model", "m"]) == ["--model", "m", *SERVER_ARGS]
    mine = ["--model", "m", "--tool-call-parser=hermes", "--enable-auto-tool-choice", "--middleware", "x.Y"]
    assert with_server_args(mine) == [*mine, "--exclude-tools-when-tool-choice-none", "--middleware", LEGACY_MIDDLEWARE]
    # vLLM's own parser accepts them (names and values).
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(with_server_args(["--model", "m"]))
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.exclude_tools_when_tool_choice_none) == (
        True, "qwen_react", True)
    assert args.middleware == [LEGACY_MIDDLEWARE]
    # The worker's parser has the same settings as defaults.
    from qwen_vllm.worker_launch import build_parser

    worker = build_parser().parse_args(["--model-path", "m"])
    assert {k: getattr(worker, k) for k in SERVER_DEFAULTS} == {k: getattr(args, k) for k in SERVER_DEFAULTS}
    # `qwen-vllm serve`: the same plus the loopback host and OpenAI-shaped 404s.
    from qwen_vllm.serving.serve import ROUTE_ERRORS_MIDDLEWARE, vllm_argv

    serve = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_argv(["--model", "m"]))
    assert {k: getattr(serve, k) for k in SERVER_DEFAULTS if k != "middleware"} == {
        k: getattr(args, k) for k in SERVER_DEFAULTS if k != "middleware"}  # fmt: skip
    assert (serve.host, serve.middleware) == ("127.0.0.1", [LEGACY_MIDDLEWARE, ROUTE_ERRORS_MIDDLEWARE])


def _request(**kw):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME], **kw)


@pytest.fixture()
def vllm_parser(qwen_tokenizer):
    """vLLM's own composed Parser around ours, as the server builds it."""
    from vllm.parser.parser_manager import ParserManager

    def make(request):
        cls = ParserManager.get_parser(tool_parser_name="qwen_react", enable_auto_tools=True)
        return cls(qwen_tokenizer, request.tools)

    return make


def test_parse_inside_vllms_parser(vllm_parser) -> None:
    request = _request(stop="END")
    parser = vllm_parser(request)
    request = parser.adjust_request(request)
    assert request.stop == ["END", "Observation:"]
    text = f"Thought: {THOUGHT}\nAction: get_weather\nAction Input: {ARGS}\n"
    _, content, calls = parser.parse(text, request, enable_auto_tools=True)
    assert content == THOUGHT and [(c.name, c.arguments) for c in calls] == [("get_weather", ARGS)]
    _, content, calls = parser.parse("Thought: x\nFinal Answer: done", request, enable_auto_tools=True)
    assert content == "done" and not calls


def test_stream_inside_vllms_parser(vllm_parser) -> None:
    """Deltas through vLLM's parse_delta: content, then one tool call whose
    name comes first and whose arguments arrive in fragments; the held-back
    tail is released by finish_streaming when the stream ends."""
    request = _request()
    parser = vllm_parser(request)
    text = f"Thought: {THOUGHT}\nAction: get_weather\nAction Input: {ARGS}\n"
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    deltas = [
        parser.parse_delta(p, [1], request, prompt_token_ids=[1], finished=i == len(pieces) - 1)
        for i, p in enumerate(pieces)
    ]
    deltas = [d for d in deltas if d is not None]
    assert "".join(d.content or "" for d in deltas) == THOUGHT
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].type == "function"
    assert all(c.index == 0 and c.function.name is None for c in calls[1:])
    assert "".join(c.function.arguments or "" for c in calls) == ARGS and len(calls) > 3


def test_stream_flushes_held_text_at_the_end(vllm_parser) -> None:
    """A ReAct line with no marker is held while it could still become a
    call; when the stream ends it is released as content (any finish reason)."""
    request = _request()
    parser = vllm_parser(request)
    first = parser.parse_delta("Thought: still thinking", [1], request, prompt_token_ids=[1], finished=False)
    last = parser.parse_delta(" about it", [1], request, prompt_token_ids=[1], finished=True)
    assert first is None and last.content == "Thought: still thinking about it"


def test_tool_choice_none_is_raw(vllm_parser) -> None:
    request = _request(tool_choice="none")
    parser = vllm_parser(request)
    text = f"Thought: {THOUGHT}\nAction: get_weather\nAction Input: {ARGS}"
    _, content, calls = parser.parse(text, request, enable_auto_tools=True)
    assert content == text and not calls


def test_legacy_functions_conversion() -> None:
    from qwen_vllm.errors import QwenRequestError
    from qwen_vllm.tools.legacy import (
        _legacy_event,
        is_legacy,
        to_legacy_response,
        to_tools_request,
    )

    fn = WEATHER["function"]
    legacy = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "t", "function_call": {"name": "get_weather", "arguments": ARGS}},
            {"role": "function", "name": "get_weather", "content": "sunny"},
        ],
        "functions": [fn],
        "function_call": {"name": "get_weather"},
    }
    assert is_legacy(legacy) and not is_legacy({"messages": [{"role": "user", "content": "q"}], "tools": [WEATHER]})
    out = to_tools_request(legacy)
    assert out["tools"] == [{"type": "function", "function": fn}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    call_id = out["messages"][1]["tool_calls"][0]["id"]
    assert out["messages"][2] == {"role": "tool", "tool_call_id": call_id, "content": "sunny"}
    for bad, needle in (
        ({**legacy, "tools": [WEATHER]}, "not both"),
        ({**legacy, "function_call": "always"}, "function_call"),
        ({"messages": [{"role": "function", "content": "x"}]}, "must follow an assistant function_call"),
    ):
        with pytest.raises(QwenRequestError, match=needle):
            to_tools_request(bad)
    reply = {"choices": [{"message": {"role": "assistant", "content": "t", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        "finish_reason": "tool_calls"}]}
    assert to_legacy_response(reply)["choices"][0] == {
        "message": {"role": "assistant", "content": "t", "function_call": {"name": "get_weather", "arguments": ARGS}},
        "finish_reason": "function_call",
    }
    chunk = b'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}'
    assert _legacy_event(chunk) == b'data: {"choices": [{"delta": {"function_call": {"arguments": "{}"}}}]}'
    assert _legacy_event(b"data: [DONE]") == b"data: [DONE]"
