"""OpenAI's legacy ``functions`` API on vLLM's chat endpoint, as Qwen's openai_api.py served it.

Qwen's own server (and the Qwen README's function-calling examples) speak the
pre-``tools`` API: request ``functions`` / ``function_call``, assistant
messages with ``function_call``, ``function`` role results, replies with
``message.function_call`` and finish_reason ``"function_call"``. vLLM 0.32
knows only ``tools`` and would silently ignore ``functions``. This ASGI
middleware (vLLM's ``--middleware``, part of tool_parser.SERVER_ARGS)
rewrites such a request into the ``tools`` form before vLLM sees it and the
response (streamed or not) back into the legacy form. Function definitions
written Qwen's way (``name_for_model``, ``parameters`` as a list; Qwen's
examples send them as ``functions`` and as ``tools``) become OpenAI tools
that carry the original, so the ReAct prompt is the one Qwen's server built.
Requests without legacy fields pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from qwen_vllm.errors import QwenRequestError
from qwen_vllm.serving.http import (
    Message,
    Receive,
    Scope,
    Send,
    error_response,
    read_body,
    replay,
)
from qwen_vllm.tools.react import is_qwen_style, openai_tool

_PATH = "/v1/chat/completions"


def has_qwen_style_tools(request: dict[str, Any]) -> bool:
    """``tools`` entries written Qwen's way (vLLM's request model would reject them)."""
    tools = request.get("tools")
    return isinstance(tools, list) and any(isinstance(t, dict) and "function" not in t and is_qwen_style(t) for t in tools)


def is_legacy(request: dict[str, Any]) -> bool:
    messages = request.get("messages")
    return (
        "functions" in request
        or "function_call" in request
        or (isinstance(messages, list) and any(
            isinstance(m, dict) and (m.get("role") == "function" or "function_call" in m) for m in messages
        ))
    )


def to_tools_request(request: dict[str, Any]) -> dict[str, Any]:
    """The ``tools`` form of a legacy request (QwenRequestError if malformed)."""
    if "tools" in request and "functions" in request:
        raise QwenRequestError("give either 'tools' or the legacy 'functions', not both")
    out = dict(request)
    functions = out.pop("functions", None)
    if functions is not None:
        if not isinstance(functions, list):
            raise QwenRequestError("functions: expected a list of function definitions")
        for i, f in enumerate(functions):
            if not isinstance(f, dict):
                raise QwenRequestError(f"functions[{i}]: expected an object, got {type(f).__name__}")
        out["tools"] = [openai_tool(f, f"functions[{i}]") for i, f in enumerate(functions)]
    elif has_qwen_style_tools(out):
        out["tools"] = [
            openai_tool(t, f"tools[{i}]") if isinstance(t, dict) and "function" not in t and is_qwen_style(t) else t
            for i, t in enumerate(out["tools"])
        ]
    if "function_call" in out:
        choice = out.pop("function_call")
        if choice in ("none", "auto"):
            out["tool_choice"] = choice
        elif isinstance(choice, dict) and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise QwenRequestError(f"function_call: expected 'none', 'auto' or {{'name': ...}}, got {choice!r}")
    messages, last_call = [], None
    for i, msg in enumerate(out.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "assistant" and msg.get("function_call") is not None:
            msg = dict(msg)
            last_call = f"call_legacy_{i}"
            msg["tool_calls"] = [{"id": last_call, "type": "function", "function": msg.pop("function_call")}]
        elif isinstance(msg, dict) and msg.get("role") == "function":
            if last_call is None:
                raise QwenRequestError(f"messages[{i}]: a function result must follow an assistant function_call")
            msg = {"role": "tool", "tool_call_id": last_call, "content": msg.get("content")}
        messages.append(msg)
    if "messages" in out:
        out["messages"] = messages
    return out


def _legacy_choice(choice: dict[str, Any], key: str) -> None:
    """tool_calls -> function_call in a response choice's message or delta."""
    body = choice.get(key)
    if isinstance(body, dict) and body.get("tool_calls"):
        fns = [c.get("function") or {} for c in body.pop("tool_calls")]
        call = {k: "".join(f.get(k) or "" for f in fns) for k in ("name", "arguments") if any(k in f for f in fns)}
        body["function_call"] = call
    elif isinstance(body, dict):
        body.pop("tool_calls", None)
    if choice.get("finish_reason") == "tool_calls":
        choice["finish_reason"] = "function_call"


def to_legacy_response(response: dict[str, Any], key: str = "message") -> dict[str, Any]:
    for choice in response.get("choices") or []:
        if isinstance(choice, dict):
            _legacy_choice(choice, key)
    return response


class LegacyFunctionsMiddleware:
    """Pure ASGI middleware (streaming-safe; client disconnects still reach vLLM)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith(_PATH):
            await self.app(scope, receive, send)
            return
        body, early = await read_body(receive)
        if early is not None:  # the client left before its body arrived
            await self.app(scope, replay(body, receive, first=early), send)
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not (is_legacy(request) or has_qwen_style_tools(request)):
            await self.app(scope, replay(body, receive), send)
            return
        legacy = is_legacy(request)
        try:
            request = to_tools_request(request)
        except QwenRequestError as exc:
            await error_response(str(exc), 400)(scope, receive, send)
            return
        body = json.dumps(request).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        # Legacy replies (function_call) only for legacy requests; Qwen-style
        # ``tools`` get OpenAI's tool_calls.
        await self.app(scope, replay(body, receive), _LegacySend(send) if legacy else send)


class _LegacySend:
    """Rewrites vLLM's response: a JSON body as a whole, SSE events one by one."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.stream = False
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            self.stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if self.stream or message.get("status") != 200:
                await self.send(message)
            else:
                self.start = message  # sent with the rewritten body (new length)
            return
        if message["type"] != "http.response.body" or (not self.stream and self.start is None):
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.stream:
            *events, self.buffer = self.buffer.split(b"\n\n")
            if not more:
                events, self.buffer = [*events, self.buffer] if self.buffer else events, b""
            out = b"".join(_legacy_event(e) + b"\n\n" for e in events)
            await self.send({"type": "http.response.body", "body": out, "more_body": more})
        elif not more:
            body = json.dumps(to_legacy_response(json.loads(self.buffer))).encode()
            headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
            await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await self.send({"type": "http.response.body", "body": body})


def _legacy_event(event: bytes) -> bytes:
    if not event.startswith(b"data: ") or event.strip() == b"data: [DONE]":
        return event
    try:
        chunk = json.loads(event[len(b"data: "):])
    except ValueError:
        return event
    return b"data: " + json.dumps(to_legacy_response(chunk, "delta")).encode()
