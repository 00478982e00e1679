"""Checks the worker adds in front of vLLM's OpenAI generation routes.

vLLM answers a body that is not UTF-8 with FastAPI's bare ``{"detail": "There
was an error parsing the body"}``, and accepts any ``n``: ``n=1000`` on a
server that runs ``max_num_seqs`` sequences at once is a thousand sequences
queued ahead of every other client, and the caller waits minutes for what is
almost surely a mistake. This pure ASGI middleware answers both with an
OpenAI-shaped 400 naming the problem; everything else reaches vLLM untouched
(the body is replayed as read).
"""

from __future__ import annotations

from typing import Any

from qwen_vllm.serving.http import error_response, json_body, read_body, replay

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class RequestChecks:
    """``limits["max_n"]`` (set once the engine is up) bounds ``n`` and ``best_of``."""

    def __init__(self, app: Any, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits

    def problem(self, body: bytes) -> str | None:
        """What is wrong with the body, or None to let vLLM judge it."""
        try:
            request = json_body(body)
        except ValueError as exc:
            return str(exc)
        max_n = self.limits.get("max_n")
        if not isinstance(request, dict) or not max_n:
            return None
        for key in ("n", "best_of"):
            value = request.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > max_n:
                return f"{key}={value} is more than the {max_n} sequences this server runs at once (--max-num-seqs)"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        body, early = await read_body(receive)
        if early is not None:  # client gone before the body arrived
            return await self.app(scope, replay(body, receive, first=early), send)
        if (problem := self.problem(body)) is not None:
            return await error_response(problem, 400)(scope, receive, send)
        await self.app(scope, replay(body, receive), send)
