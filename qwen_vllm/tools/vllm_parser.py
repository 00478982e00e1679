"""vLLM tool-call parser ``qwen_react``: Qwen's ReAct replies as OpenAI ``tool_calls``.

The prompt side needs nothing here: QWenTokenizer renders ``tools`` as Qwen's
ReAct instruction (function_call.react_messages) whenever vLLM's chat
endpoint passes them. This parser is the output side, registered by the
plugin under ``qwen_react``. vLLM only runs a tool parser chosen on its
command line, so tool calling needs these server flags (``SERVER_ARGS``)::

    --enable-auto-tool-choice --tool-call-parser qwen_react
    --exclude-tools-when-tool-choice-none
    --middleware qwen_vllm.tools.legacy.LegacyFunctionsMiddleware

vLLM 0.32 picks a parser only from ``--tool-call-parser`` and parses only with
``--enable-auto-tool-choice`` (vllm/parser/parser_manager.py); without them a
request with tools and tool_choice "auto" is refused with 400. The third flag
makes tool_choice "none" render a plain chat prompt (the template never sees
tool_choice). The middleware serves OpenAI's legacy ``functions`` API (what
Qwen's openai_api.py spoke), which vLLM would otherwise ignore.
``qwen-vllm serve`` (serve.py) adds them all.

Behaviour: ``adjust_request`` adds the "Observation:" stop; replies are parsed
by function_call.ReactParser, so streamed deltas (content, then the call's
name, then argument fragments) add up to the non-streamed result. Like
vLLM's own K2-Horizon parser this is an "engine-based" streaming parser: vLLM
hands it each delta and calls ``finish_streaming()`` at the end, which
releases text held back while it was still ambiguous. Named and "required"
tool_choice are parsed from the ReAct reply (not forced into JSON); a named
choice accepts only a call to that tool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
)
from vllm.tool_parsers.abstract_tool_parser import Tool, ToolParser

from qwen_vllm.errors import QwenRequestError
from qwen_vllm.tools.react import (
    OBSERVATION_STOP,
    PARSER_NAME,
    ReactParser,
    ToolSpec,
    tool_specs,
)

LEGACY_MIDDLEWARE = "qwen_vllm.tools.legacy.LegacyFunctionsMiddleware"
# vLLM server options (argparse dests) tool calling needs: `qwen-vllm serve`
# adds them as flags (with_server_args), the worker's parser as defaults.
SERVER_DEFAULTS: dict[str, Any] = {
    "enable_auto_tool_choice": True,
    "tool_call_parser": PARSER_NAME,
    "exclude_tools_when_tool_choice_none": True,
    "middleware": [LEGACY_MIDDLEWARE],
}


def with_server_args(argv: Sequence[str]) -> list[str]:
    """``argv`` plus the flags of SERVER_DEFAULTS it does not already set (a
    user's own --tool-call-parser or --no-exclude-... wins; our middleware is
    added beside theirs)."""
    argv = list(argv)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra: list[str] = []
    for dest, value in SERVER_DEFAULTS.items():
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, list):
            for item in value:
                if item not in argv and f"{flag}={item}" not in argv:
                    extra += [flag, item]
        elif not given & {flag, "--no-" + flag[2:]}:
            extra += [flag] if value is True else [flag, value]
    return argv + extra


SERVER_ARGS = tuple(with_server_args([]))


def _continuation(request: Any) -> bool:
    """The prompt ended in "\\nThought:" (the conversation ends with a tool result)."""
    messages = getattr(request, "messages", None) or []
    last = messages[-1] if messages else None
    return isinstance(last, dict) and last.get("role") in ("tool", "function")


def _named(request: Any) -> str | None:
    choice = getattr(request, "tool_choice", None)
    return choice.function.name if isinstance(choice, ChatCompletionNamedToolChoiceParam) else None


class QwenReactToolParser(ToolParser):
    """Qwen ReAct replies -> OpenAI tool calls (one call per reply, as Qwen makes)."""

    supports_required_and_named = False
    engine_based_streaming = True

    def __init__(self, tokenizer: Any, tools: list[Tool] | None = None) -> None:
        super().__init__(tokenizer, tools)
        try:
            self._specs: list[ToolSpec] = tool_specs([t.model_dump() for t in self.tools])
        except QwenRequestError:
            # The chat template rejects such a request with a 400 before any
            # output exists; the parser must not fail first (that would be a 500).
            self._specs = []
        self._stream: ReactParser | None = None
        self._text = ""
        self._raw = False

    def adjust_request(self, request: Any) -> Any:
        request = super().adjust_request(request)
        if isinstance(request, ChatCompletionRequest) and request.tools:
            stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
            if OBSERVATION_STOP not in stop:
                request.stop = [*stop, OBSERVATION_STOP]
        return request

    def _parser(self, request: Any) -> ReactParser:
        return ReactParser(self._specs, continuation=_continuation(request), only=_named(request))

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        if getattr(request, "tool_choice", None) == "none" or not self._specs:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        parser = self._parser(request)
        parser.feed(model_output, final=True)
        reply = parser.result()
        if reply.tool_call is None:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=reply.content)
        call = ToolCall(
            id=reply.tool_call.id,
            function=FunctionCall(id=reply.tool_call.id, name=reply.tool_call.name, arguments=reply.tool_call.arguments),
        )
        return ExtractedToolCallInformation(tools_called=True, tool_calls=[call], content=reply.content or None)

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        # Engine-based streaming: vLLM passes only the new text each time.
        if self._stream is None:
            self._raw = getattr(request, "tool_choice", None) == "none" or not self._specs
            self._stream = self._parser(request)
        if self._raw:
            return DeltaMessage(content=delta_text) if delta_text else None
        self._text += delta_text
        return self._delta(*self._stream.feed(self._text, final=False))

    def finish_streaming(self) -> DeltaMessage | None:
        if self._stream is None or self._raw:
            return None
        return self._delta(*self._stream.feed(self._text, final=True))

    def _delta(self, content: str, name: str | None, args: str) -> DeltaMessage | None:
        """One chunk: new content; the call's id, type and name when it starts;
        new argument text."""
        calls = []
        if name is not None:
            calls.append(
                DeltaToolCall(
                    index=0,
                    id=self._stream.call_id,
                    type="function",
                    function=DeltaFunctionCall(name=name, arguments=args),
                )
            )
        elif args:
            calls.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=args)))
        if not content and not calls:
            return None
        return DeltaMessage(content=content or None, tool_calls=calls)
