"""Small HTTP helpers shared by the worker routes and the OpenAI front."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse

T = TypeVar("T")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``; cancel it (and whatever it awaits upstream) if the client
    disconnects first, returning None. The request body must already be read:
    the watcher consumes the request's remaining ASGI messages."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def json_body(body: bytes) -> Any:
    """A request body's JSON; ValueError naming what is wrong (encoding or syntax)."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    except ValueError as exc:
        raise ValueError(f"the request body is not valid JSON ({exc})") from None


def openai_error(message: str, status: int, err_type: str, code: Any = None) -> dict[str, Any]:
    """An error body in the shape vLLM's and OpenAI's servers use."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": status if code is None else code}}


class ApiKeys:
    """Pure ASGI middleware: every route but ``open_paths`` needs ``Authorization: Bearer <key>``.

    Unlike vLLM's own check (only /v1, /v2, ... prefixes), nothing else is left
    open: /health, /metrics, /tokenize, /invocations, /docs and the FastChat
    routes all need the key. Keys are compared as digests in constant time.
    """

    def __init__(self, app: Any, keys: Iterable[str], open_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]
        self.open_paths = frozenset(open_paths)

    def _allowed(self, scope: dict) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and any(secrets.compare_digest(digest, d) for d in self.digests)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            self.digests
            and scope["type"] in ("http", "websocket")
            and scope.get("method") != "OPTIONS"  # CORS preflight carries no credentials
            and scope["path"] not in self.open_paths
            and not self._allowed(scope)
        ):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": "invalid API key"})
            body = openai_error("invalid API key: send 'Authorization: Bearer <key>'", 401, "invalid_request_error", "invalid_api_key")
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


DEFAULT_MAX_BODY_MB = 16.0


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes gets a 413.

    A declared Content-Length is checked before anything is read; a chunked
    body is counted as it arrives. Neither vLLM's server nor uvicorn limits
    bodies, so without this one huge request would be buffered in memory.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _reject(self, scope: dict, receive: Any, send: Any, size: str) -> None:
        message = f"the request body is {size} bytes; the limit is {self.limit} bytes"
        await JSONResponse(openai_error(message, 413, "invalid_request_error"), status_code=413)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send, declared)
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if started:
                raise
            await self._reject(scope, receive, send, f"more than {self.limit}")
