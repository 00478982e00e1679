"""Admission control: a bounded queue in front of the engine.

vLLM accepts every request and queues it; under a burst the queue grows until
clients time out, and nobody is told to back off. The worker admits at most
``capacity`` generation requests at once (running or waiting for the engine):
``--max-num-seqs`` running plus ``--max-queued-requests`` waiting, or
FastChat's ``--limit-worker-concurrency`` when given (fschat's worker queued
past it; here the excess is refused, as its "server busy" did). Past the
capacity an OpenAI route answers 429 with ``Retry-After`` (the openai SDK
retries it; the front tries another worker first) and a FastChat route its
in-band ENGINE_OVERLOADED error. The count is also the queue length the
worker reports to the FastChat controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response

from qwen_vllm.serving.http import Receive, Scope, Send, error_response
from qwen_vllm.worker.protocol import ENGINE_OVERLOADED, error_chunk, frame

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
FASTCHAT_PATHS = frozenset({"/worker_generate_stream", "/worker_generate"})
RETRY_AFTER_S = 1  # a queue slot frees when any request finishes: retry soon


@dataclass
class Gate:
    """How many generation requests are in; ``capacity`` None admits all
    (set once the engine's ``max_num_seqs`` is known)."""

    capacity: int | None = None
    in_flight: int = 0
    refused: int = 0

    def busy_message(self) -> str:
        running = f"{self.in_flight} request{'' if self.in_flight == 1 else 's'}"
        return (
            f"server busy: {running} running or queued on this worker, its limit is {self.capacity}; "
            f"retry in {RETRY_AFTER_S} s"
        )


def capacity(max_num_seqs: int, max_queued_requests: int | None, limit_worker_concurrency: int | None) -> int:
    """The worker's admission limit (FastChat's flag wins when given). By
    default one more full batch may wait: a queued request then waits about
    one reply at full batch, not several (docs/reliability.md)."""
    if limit_worker_concurrency is not None:
        return limit_worker_concurrency
    return max_num_seqs + (max_num_seqs if max_queued_requests is None else max_queued_requests)


class Admission:
    """Pure ASGI middleware counting generation requests through ``gate``;
    past its capacity they are refused before vLLM sees them."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in OPENAI_PATHS | FASTCHAT_PATHS:
            return await self.app(scope, receive, send)
        gate = self.gate
        if gate.capacity is not None and gate.in_flight >= gate.capacity:
            gate.refused += 1
            return await self.refuse(path, scope, receive, send)
        gate.in_flight += 1
        try:
            await self.app(scope, receive, send)  # returns once the response (stream) has ended
        finally:
            gate.in_flight -= 1

    async def refuse(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        message = self.gate.busy_message()
        response: Response
        if path in OPENAI_PATHS:
            response = error_response(message, 429, headers={"Retry-After": str(RETRY_AFTER_S)})
        elif path == "/worker_generate_stream":  # FastChat's clients read errors in-band
            response = Response(frame(error_chunk(message, ENGINE_OVERLOADED)))
        else:
            response = JSONResponse(error_chunk(message, ENGINE_OVERLOADED))
        await response(scope, receive, send)
