"""The HTTP helpers of every server here (worker routes and checks, legacy
``functions`` middleware, OpenAI front, stack): addresses, OpenAI-shaped
errors, ASGI body buffering, API keys and body limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hosts that mean "every interface": a server binds them, a client cannot dial them.
WILDCARD_HOSTS = (None, "", "0.0.0.0", "::")
# HTTP status -> the error "type" vLLM's and OpenAI's servers put in the body.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    429: "RateLimitError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def dial_host(host: str | None) -> str:
    """The address to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def http_url(host: str | None, port: int) -> str:
    """``http://host:port`` for ``host`` as a server binds it (IPv6 bracketed)."""
    host = dial_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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


def openai_error(message: str, status: int, err_type: str | None = None, code: Any = None) -> dict[str, Any]:
    """An error body in the shape vLLM's and OpenAI's servers use."""
    err_type = err_type or ERROR_TYPES.get(status, "InternalServerError")
    return {"error": {"message": message, "type": err_type, "param": None, "code": status if code is None else code}}


def error_response(message: str, status: int, code: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse(openai_error(message, status, code=code), status_code=status, headers=headers)


async def read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """(the whole request body, None), or (what arrived, the message that
    ended it early: the client left before sending it all)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body, message
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body, None


def replay(body: bytes, receive: Receive, first: Message | None = None) -> Receive:
    """A ``receive`` that gives the app ``body`` (or ``first``) again, then
    whatever the client sends next (its disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first or {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


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


class OpenAIRouteErrors:
    """Pure ASGI middleware: FastAPI's bare 404/405 bodies for a route the app
    does not serve become OpenAI-shaped errors naming the route and the /v1
    routes it does serve. One mechanism for the front, the worker and
    ``qwen-vllm serve`` (vLLM's own app, given it with ``--middleware``)."""

    BARE = (b'{"detail":"Not Found"}', b'{"detail":"Method Not Allowed"}')

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: Message | None = None

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                held = message
                return
            if held is not None:
                start, held = held, None
                if message.get("body", b"").strip() in self.BARE and not message.get("more_body"):
                    status = start["status"]
                    body = json.dumps(openai_error(self.message(scope, status), status)).encode()
                    headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
                    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
                await send(start)
            await send(message)

        await self.app(scope, receive, rewrite)

    @staticmethod
    def message(scope: Scope, status: int) -> str:
        method, path = scope["method"], scope["path"]
        why = "Qwen chat models do not serve embeddings here; " if path.rstrip("/").endswith("/embeddings") else ""
        verb = "is not served by" if status == 404 else "does not accept this method on"
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())  # Starlette sets scope["app"]
        served = sorted({r.path for r in routes if getattr(r, "path", "").startswith("/v1/")})
        return f"{method} {path} {verb} this server: {why}it serves {', '.join(served) or 'no /v1 routes'}"
