"""``qwen-vllm openai-api``: one OpenAI endpoint in front of FastChat-registered workers.

Replaces fschat's openai_api_server (streaming broken under pydantic 2, five
hops per request, re-implemented OpenAI semantics). A request goes to a
worker serving the body's ``model`` and the worker's own vLLM ``/v1``
response is relayed byte for byte, streams included, so every OpenAI feature
of vLLM and of our plugin (chat template, tools, logprobs) arrives unchanged.
The controller names the workers (``/get_worker_address``, asked in the
background at most once a second per model); the front sends each request to
the one with the fewest requests in flight (see Dispatcher). One hop per
request in steady state: to the worker.

Failure handling: a worker that refuses the connection (or breaks a stream,
which then ends with an error event) is marked down for a few seconds,
another is asked for, and the controller is told to re-poll its workers
(``/refresh_all_workers``) so it drops the dead one; when none is left the
client gets a 503 with ``Retry-After`` naming the model within the connect
timeout -- also once the controller has forgotten the model, for RECENT_S
(404 is only for names not served recently). A worker whose queue is full
answers 429 (worker/admission.py): another known worker is tried, and the
429 is passed on only when none admits the request.
While the controller is unreachable or restarting (it forgets every worker
until their next heartbeat), the workers it named keep serving. The model
list is cached for 2 s. A client that disconnects
closes the upstream request, so vLLM aborts it. ``--api-keys`` guards every
route; bodies over ``--max-body-mb`` get a 413; on SIGTERM in-flight responses
get STOP_GRACE_S to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qwen_vllm.serving.http import (
    DEFAULT_MAX_BODY_MB,
    ApiKeys,
    BodyLimit,
    OpenAIRouteErrors,
    error_response,
    json_body,
    openai_error,
    until_disconnect,
)

logger = logging.getLogger("qwen_vllm.serving.front")

CONTROLLER_TIMEOUT_S = 3.0
WORKER_CONNECT_TIMEOUT_S = 3.0
MODELS_TTL_S = 2.0  # how long a controller answer about models is reused
DOWN_S = 10.0  # how long a worker that refused a connection is skipped
ASK_S = 1.0  # the controller is asked about a model in the background at most this often
SEEN_S = 180.0  # how long a worker the controller named stays in the pool (2 heartbeat expiries)
MAX_PICKS = 4  # controller answers tried per attempt before giving up on a model
MAX_ATTEMPTS = 3  # workers tried per request
# A model served within this window that has no live worker now gets a 503
# (retry), not a 404 (never served): the controller forgets a dead worker at
# once when asked to re-poll (mark_down), and a restarted worker must load its
# engine again -- minutes for a large model -- before it registers.
RECENT_S = 900.0
RETRY_AFTER_S = 5  # what a 503 for a model without a live worker tells clients
STOP_GRACE_S = 10  # on SIGTERM, in-flight responses get this long to finish, then are closed
RELAYED_PATHS = ("/v1/chat/completions", "/v1/completions")
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "host", "authorization"}
# A relayed response gets the front's own server's date and server headers.
NOT_RELAYED = HOP_BY_HOP | {"date", "server"}


def relayed_headers(upstream: httpx.Response) -> dict[str, str]:
    """The worker's response headers that the front passes on."""
    return {k: v for k, v in upstream.headers.items() if k.lower() not in NOT_RELAYED}


class NoWorker(Exception):
    """No live worker serves the model; ``status`` is 404 (unknown) or 503."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        """OpenAI-shaped; a 503 says when to retry (the openai SDK honours it)."""
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return error_response(str(self), self.status, headers=headers)


class Dispatcher:
    """Which worker serves a model: the controller names workers, this front balances.

    The controller is asked in the background at most once per ASK_S per
    model, and on the request's path only when no known worker is usable.
    Every worker it names joins the model's pool for SEEN_S; with
    shortest_queue dispatch (it counts each answer as a queued request) its
    successive answers rotate over the workers, so the pool soon holds them all. Each request goes
    to the pool member with the fewest requests in flight from this front:
    real-time load, where the controller only sees heartbeat-old queue lengths.
    """

    def __init__(self, controller_address: str, client: httpx.AsyncClient) -> None:
        self.controller = controller_address.rstrip("/")
        self.client = client
        self._models: list[str] | None = None  # None until the controller first answered
        self._models_at = -math.inf
        self._pool: dict[str, dict[str, float]] = {}  # model -> address -> last named
        self._asked: dict[str, float] = {}  # model -> last time the controller was asked
        self._inflight: dict[str, int] = {}  # address -> requests this front has running there
        self._chosen: dict[str, float] = {}  # address -> when a request last went there
        self._down: dict[str, float] = {}  # address -> skip until
        self._served: dict[str, float] = {}  # model -> last time a worker was known for it
        self._refresh: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # background questions to the controller

    async def _post(self, path: str, payload: dict | None = None) -> Any:
        r = await self.client.post(self.controller + path, json=payload, timeout=CONTROLLER_TIMEOUT_S)
        r.raise_for_status()
        return r.json()

    async def models(self) -> list[str]:
        if self._models is not None and time.monotonic() - self._models_at < MODELS_TTL_S:
            return self._models
        try:
            self._models = sorted((await self._post("/list_models"))["models"])
            self._models_at = time.monotonic()
            self._served.update(dict.fromkeys(self._models, self._models_at))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if self._models is None:
                raise NoWorker(f"the FastChat controller at {self.controller} is unreachable ({exc})", 503) from exc
            logger.warning("controller unreachable (%s); using its last model list", exc)
        return self._models

    async def _ask(self, model: str) -> str:
        """The controller's worker for ``model`` ("" if none), added to the pool."""
        self._asked[model] = time.monotonic()
        address = (await self._post("/get_worker_address", {"model": model}))["address"]
        if address:
            self._pool.setdefault(model, {})[address] = self._served[model] = time.monotonic()
        return address

    def _candidates(self, model: str, exclude: set[str]) -> list[str]:
        """Known workers not yet tried; those marked down only when no other is left
        (a worker that merely timed out under load is better than a 503)."""
        now = time.monotonic()
        known = [a for a, named in self._pool.get(model, {}).items() if now - named < SEEN_S and a not in exclude]
        return [a for a in known if self._down.get(a, 0.0) <= now] or known

    async def _discover(self, model: str) -> None:
        """Ask the controller about ``model`` (twice when its first answer is
        already known: shortest_queue's next answer may be a replica not known yet)."""
        try:
            known = set(self._pool.get(model, ()))
            if await self._ask(model) in known:
                await self._ask(model)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            logger.warning("could not ask the controller %s about %r: %s", self.controller, model, exc)

    async def settled(self) -> None:
        """Wait for the background questions to the controller."""
        await asyncio.gather(*self._tasks)

    async def pick(self, model: str, exclude: set[str], known_only: bool = False) -> str:
        """The least busy usable worker for ``model``, not in ``exclude``.

        Known workers are used at once while the controller is asked in the
        background; it is asked on the request's path only when none is usable.
        While the controller is unreachable or restarted (it knows no worker
        until their next heartbeat), the pool keeps serving. ``known_only``:
        never wait for the controller (a busy worker's 429 is the answer then).
        """
        if time.monotonic() - self._asked.get(model, -math.inf) >= ASK_S:
            self._asked[model] = time.monotonic()
            task = asyncio.create_task(self._discover(model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if candidates := self._candidates(model, exclude):
            self._served[model] = time.monotonic()
            return self._least_busy(candidates)
        if known_only:
            raise NoWorker(f"no other worker known for model {model!r}", 503)
        try:
            for _ in range(MAX_PICKS):
                if not await self._ask(model):
                    break
                if candidates := self._candidates(model, exclude):
                    return self._least_busy(candidates)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise NoWorker(f"the FastChat controller at {self.controller} is unreachable ({exc})", 503) from exc
        if model not in await self.models():
            ago = time.monotonic() - self._served.get(model, -math.inf)
            if ago < RECENT_S:
                raise NoWorker(f"model {model!r} has no live worker right now (it was served {ago:.0f} s ago); retry shortly", 503)
            served = ", ".join(await self.models()) or "none"
            raise NoWorker(f"model {model!r} is not served here; available models: {served}", 404)
        raise NoWorker(f"no reachable worker for model {model!r} (tried {', '.join(sorted(exclude)) or 'none'})", 503)

    def _least_busy(self, candidates: list[str]) -> str:
        """Fewest requests in flight; among equals the least recently chosen (round robin)."""
        return min(candidates, key=lambda a: (self._inflight.get(a, 0), self._chosen.get(a, -math.inf)))

    def started(self, address: str) -> None:
        self._inflight[address] = self._inflight.get(address, 0) + 1
        self._chosen[address] = time.monotonic()

    def finished(self, address: str) -> None:
        self._inflight[address] -= 1

    def mark_down(self, address: str) -> None:
        """Skip ``address`` for a while and have the controller re-poll its workers."""
        logger.warning("worker %s is unreachable; skipping it for %.0f s", address, DOWN_S)
        self._down[address] = time.monotonic() + DOWN_S
        self._models_at = -math.inf
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_controller())

    async def _refresh_controller(self) -> None:
        # The controller polls every worker and drops those that do not answer.
        try:
            await self.client.post(self.controller + "/refresh_all_workers", timeout=60)
        except httpx.HTTPError as exc:
            logger.warning("could not ask the controller to refresh its workers: %s", exc)
        self._models_at = -math.inf


def model_of(body: bytes) -> str:
    """The request's ``model``; ValueError naming what is wrong with the body."""
    data = json_body(body)
    if not isinstance(data, dict):
        raise ValueError(f"the request body must be a JSON object, got {type(data).__name__}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"the request body needs a string 'model', got {model!r}")
    return model


async def _relay_body(upstream: httpx.Response, on_broken: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        async for piece in upstream.aiter_raw():
            yield piece
    except httpx.HTTPError as exc:  # the worker went away mid-response
        logger.warning("worker stream broke: %s", exc)
        on_broken()
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            body = openai_error(f"the worker stopped mid-stream ({type(exc).__name__})", 502)
            yield f"data: {json.dumps(body)}\n\n".encode()


class RelayedResponse(StreamingResponse):
    """A worker's response, relayed; the upstream is closed however sending ends
    (finished, client gone, cancelled), so the worker aborts what it still runs."""

    def __init__(self, upstream: httpx.Response, on_close: Callable[[], None], on_broken: Callable[[], None]) -> None:
        super().__init__(_relay_body(upstream, on_broken), status_code=upstream.status_code, headers=relayed_headers(upstream))
        self.upstream = upstream
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_close()


def create_app(
    controller_address: str,
    api_keys: list[str] | None = None,
    worker_api_key: str | None = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
) -> FastAPI:
    """The front's ASGI app (no server started)."""
    client = httpx.AsyncClient(
        trust_env=False,
        timeout=httpx.Timeout(float(os.environ.get("FASTCHAT_WORKER_API_TIMEOUT", 100)), connect=WORKER_CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )
    dispatcher = Dispatcher(controller_address, client)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await dispatcher.settled()
        await client.aclose()

    app = FastAPI(title="qwen-vllm OpenAI API (FastChat controller front)", lifespan=lifespan)
    app.state.dispatcher = dispatcher

    app.add_middleware(OpenAIRouteErrors)
    app.add_middleware(BodyLimit, limit=int(max_body_mb * 2**20))
    app.add_middleware(ApiKeys, keys=api_keys or ())  # outermost: no key, nothing read

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "qwen-vllm"}

    @app.get("/v1/models")
    async def list_models() -> Response:
        try:
            return JSONResponse({"object": "list", "data": [model_card(m) for m in await dispatcher.models()]})
        except NoWorker as exc:
            return exc.response()

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        try:
            served = await dispatcher.models()
        except NoWorker as exc:
            return exc.response()
        if model in served:
            return JSONResponse(model_card(model))
        return error_response(f"model {model!r} is not served here; available models: {', '.join(served) or 'none'}", 404)

    async def relay(request: Request) -> Response:
        body = await request.body()
        try:
            model = model_of(body)
        except ValueError as exc:
            return error_response(str(exc), 400)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if worker_api_key:
            headers["authorization"] = f"Bearer {worker_api_key}"
        tried: set[str] = set()
        busy: Response | None = None  # a worker's 429, passed on when no other worker admits the request
        for _ in range(MAX_ATTEMPTS):
            try:
                address = await dispatcher.pick(model, tried, known_only=busy is not None)
            except NoWorker as exc:
                return busy or exc.response()
            tried.add(address)
            dispatcher.started(address)
            relayed = False
            try:
                upstream = await until_disconnect(
                    request,
                    client.send(client.build_request("POST", address + request.url.path, content=body, headers=headers), stream=True),
                )
                if upstream is None:  # the client left while the worker was working
                    return Response(status_code=499)
                if upstream.status_code == 429:  # its queue is full: another worker may admit it
                    content = await upstream.aread()
                    await upstream.aclose()
                    busy = Response(content, status_code=429, headers=relayed_headers(upstream))
                    continue
                relayed = True
                return RelayedResponse(
                    upstream, lambda a=address: dispatcher.finished(a), lambda a=address: dispatcher.mark_down(a)
                )
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
                return error_response(f"worker {address} did not answer in time ({type(exc).__name__})", 504)
            except httpx.TransportError as exc:
                # Refused, reset or closed before any response: a dead worker (or
                # a pooled connection to one). Generation has no side effects,
                # so another worker may run the request.
                logger.warning("could not reach %s for %r: %s: %s", address, model, type(exc).__name__, exc)
                dispatcher.mark_down(address)
            finally:
                if not relayed:
                    dispatcher.finished(address)
        return busy or NoWorker(f"no reachable worker for model {model!r} (tried {', '.join(sorted(tried))})", 503).response()

    for path in RELAYED_PATHS:
        app.add_api_route(path, relay, methods=["POST"])

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--controller-address", default="http://localhost:21001", help="FastChat controller URL")
    parser.add_argument(
        "--api-keys",
        type=lambda s: [k for k in s.split(",") if k],
        help="comma-separated keys; every route then requires 'Authorization: Bearer <key>'",
    )
    parser.add_argument("--worker-api-key", help="key sent to workers started with --api-key")
    parser.add_argument(
        "--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, help="largest request body accepted (413 beyond)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.controller_address, args.api_keys, args.worker_api_key, args.max_body_mb)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=STOP_GRACE_S)
    return 0


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("openai-api")
