"""Checks the worker adds in front of vLLM's OpenAI routes.

vLLM answers a body that is not UTF-8 with FastAPI's bare ``{"detail": "There
was an error parsing the body"}``, and accepts any ``n``: ``n=1000`` on a
server that runs ``max_num_seqs`` sequences at once is a thousand sequences
queued ahead of every other client, and the caller waits minutes for what is
almost surely a mistake. And an adapter given to ``/v1/load_lora_adapter``
that does not fit the model fails inside the engine as a 500. This pure ASGI
middleware answers each with an OpenAI-shaped 400 naming the problem (adapters
are checked as at start-up: checkpoints/lora.py ``serving_dir``, whose
directory replaces the path given); everything else reaches vLLM untouched
(the body is replayed as read).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qwen_vllm.errors import QwenVLLMError
from qwen_vllm.serving.http import error_response, json_body, read_body, replay

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
LOAD_LORA_PATH = "/v1/load_lora_adapter"


class RequestChecks:
    """``limits`` (set once the engine is up): ``max_n`` bounds ``n`` and
    ``best_of``; ``model`` and ``max_lora_rank`` are what adapters are checked against."""

    def __init__(self, app: Any, limits: dict[str, Any]) -> None:
        self.app = app
        self.limits = limits

    async def adapter_body(self, body: bytes) -> bytes:
        """The load request with the adapter checked (QwenVLLMError if it does
        not fit) and its path replaced by the directory vLLM should load."""
        from qwen_vllm.checkpoints.lora import serving_dir
        from qwen_vllm.plugin.checkpoint import is_qwen_v1

        request = json_body(body)
        model, rank = self.limits.get("model"), self.limits.get("max_lora_rank")
        if not (isinstance(request, dict) and isinstance(request.get("lora_path"), str) and rank and is_qwen_v1(model)):
            return body  # vLLM judges it
        served = await asyncio.to_thread(serving_dir, model, request["lora_path"], rank)
        return json.dumps({**request, "lora_path": str(served)}).encode()

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
        path = scope["path"] if scope["type"] == "http" and scope.get("method") == "POST" else None
        if path not in GENERATION_PATHS and path != LOAD_LORA_PATH:
            return await self.app(scope, receive, send)
        body, early = await read_body(receive)
        if early is not None:  # client gone before the body arrived
            return await self.app(scope, replay(body, receive, first=early), send)
        if path == LOAD_LORA_PATH:
            try:
                body = await self.adapter_body(body)
            except (QwenVLLMError, ValueError) as exc:
                return await error_response(str(exc), 400)(scope, receive, send)
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        elif (problem := self.problem(body)) is not None:
            return await error_response(problem, 400)(scope, receive, send)
        await self.app(scope, replay(body, receive), send)
