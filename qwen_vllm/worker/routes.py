"""FastChat's worker API as a vLLM endpoint plugin: one server, both protocols.

``FastChatWorkerPlugin`` (entry point ``vllm.endpoint_plugins:
qwen_vllm_fastchat``; loaded when ``VLLM_PLUGINS`` names it, as
``qwen-vllm worker`` does) adds fschat 0.2.36's worker routes to vLLM's own
OpenAI API server, so one process serves ``/worker_generate_stream``,
``/worker_generate``, ``/worker_get_status``, ``/count_token``,
``/worker_get_conv_template``, ``/model_details``, ``/ready`` and vLLM's
``/v1/*`` and ``/health``, all on the same engine client. Protocol mapping:
protocol.py; controller registration: registration.py; the bounded queue
in front of the engine: admission.py.

A client that disconnects cancels the handler, which cancels
``engine_client.generate()``, which aborts the vLLM request.

Guards added to vLLM's server: with ``--api-key`` every route needs the key
(vLLM checks only /v1-style prefixes) except ``/worker_get_status``, which the
controller polls, and ``/ready``; bodies over ``--max-body-mb`` get a 413; request_checks.py
rejects bodies that are not UTF-8 JSON, ``n`` beyond ``--max-num-seqs`` and
adapters that do not fit the model.
"""

from __future__ import annotations

import asyncio
import uuid
from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastchat.constants import SERVER_ERROR_MSG
from vllm.exceptions import VLLMClientError

from qwen_vllm.chat_template import prompt_string_ids
from qwen_vllm.errors import QwenRequestError
from qwen_vllm.serving.http import (
    DEFAULT_MAX_BODY_MB,
    ApiKeys,
    BodyLimit,
    OpenAIRouteErrors,
    error_response,
    http_url,
    json_body,
    until_disconnect,
)
from qwen_vllm.worker.admission import Admission, Gate, capacity
from qwen_vllm.worker.protocol import (
    INTERNAL_ERROR,
    PARAM_OUT_OF_RANGE,
    VALIDATION_TYPE_ERROR,
    ChunkBuilder,
    WorkerRequestError,
    conv_template,
    default_conv_template,
    error_chunk,
    frame,
    sampling_params,
)
from qwen_vllm.worker.registration import ControllerLink
from qwen_vllm.worker.request_checks import RequestChecks

PLUGIN_NAME = "qwen_vllm_fastchat"
# Open even with --api-key: the FastChat controller polls the status and can
# send no key; load balancers probe readiness. Neither tells more than model
# names, queue length and "ready".
OPEN_PATHS = ("/worker_get_status", "/ready")
READY_CHECK_TIMEOUT_S = 5.0
ENGINE_STOPPED_GRACE_S = 2  # on SIGTERM, once the engine has stopped, open responses get this long to flush


def api_keys(args: Namespace) -> list[str]:
    """The worker's keys: --api-key, else VLLM_API_KEY (vLLM's own precedence)."""
    from vllm import envs

    return [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]


@dataclass(frozen=True)
class WorkerSettings:
    """FastChat worker options; ``qwen-vllm worker`` adds them to vLLM's args.

    Under a plain ``vllm serve`` (no such args) the routes still work and
    nothing registers with a controller.
    """

    model_names: list[str]
    worker_address: str | None
    controller_address: str | None
    limit_worker_concurrency: int | None  # FastChat's flag: the admission limit when given
    max_queued_requests: int | None  # None: as many as --max-num-seqs
    conv_template: str | None
    local_ready_url: str
    api_key: str | None = None  # sent to the worker's own /ready

    @classmethod
    def from_args(cls, args: Namespace) -> WorkerSettings:
        names = args.served_model_name or [args.model]  # vLLM's own default name
        register = getattr(args, "controller_address", None) and not getattr(args, "no_register", False)
        return cls(
            model_names=list(names),
            worker_address=getattr(args, "worker_address", None),
            controller_address=args.controller_address if register else None,
            limit_worker_concurrency=getattr(args, "limit_worker_concurrency", None),
            max_queued_requests=getattr(args, "max_queued_requests", None),
            conv_template=getattr(args, "conv_template", None),
            local_ready_url=http_url(args.host, args.port) + "/ready",
            api_key=next(iter(api_keys(args)), None),
        )


def _hf_defaults(diff_sampling_param: dict[str, Any]) -> dict[str, Any]:
    """vLLM's generation-config defaults under HF names (max_tokens -> max_new_tokens)."""
    defaults = dict(diff_sampling_param)
    if "max_tokens" in defaults:
        defaults["max_new_tokens"] = defaults.pop("max_tokens")
    return defaults


class FastChatWorker:
    """FastChat's worker semantics over one vLLM engine client."""

    def __init__(self, engine_client: Any, settings: WorkerSettings, gate: Gate, served_models: Any = None) -> None:
        model_config = engine_client.model_config
        self.engine = engine_client
        self.settings = settings
        self.gate = gate
        self.served_models = served_models  # vLLM's OpenAIServingModels: its LoRA adapters, loaded at run time too
        self.max_model_len = model_config.max_model_len
        self.chat_format = model_config.try_get_generation_config().get("chat_format", "chatml")
        self.defaults = _hf_defaults(model_config.get_diff_sampling_param())
        self.tokenizer = engine_client.renderer.get_tokenizer()
        self.conv = conv_template(settings.conv_template or default_conv_template(self.chat_format))
        self.max_n = engine_client.vllm_config.scheduler_config.max_num_seqs
        gate.capacity = capacity(self.max_n, settings.max_queued_requests, settings.limit_worker_concurrency)

    def adapters(self) -> dict[str, Any]:
        """LoRA adapter name -> vLLM LoRARequest, as vLLM's /v1 serves them now."""
        return dict(getattr(self.served_models, "lora_requests", None) or {})

    def status(self) -> dict[str, Any]:
        """What the controller routes and balances on: every name served here
        (the model's and each LoRA adapter's, each a model of its own to
        FastChat), and queue_length, the generation requests running or
        waiting here on either protocol (admission.py)."""
        names = [*self.settings.model_names, *self.adapters()]
        return {"model_names": names, "speed": 1, "queue_length": self.gate.in_flight}

    async def ready(self) -> str | None:
        """None when the engine can generate, else why not."""
        if self.engine.errored:
            return f"the engine is dead ({self.engine.dead_error})"
        try:
            await asyncio.wait_for(self.engine.check_health(), READY_CHECK_TIMEOUT_S)
        except Exception as exc:  # any failure of the probe means "not ready"
            return f"the engine failed its health check ({type(exc).__name__}: {exc})"
        return None

    def prompt_ids(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, str):
            raise WorkerRequestError(f"prompt must be a string, got {type(prompt).__name__}", VALIDATION_TYPE_ERROR)
        return prompt_string_ids(self.tokenizer, prompt)

    async def generate_stream(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """FastChat chunks for one request; a bad request yields one error chunk."""
        try:
            prompt = params.get("prompt")
            ids = self.prompt_ids(prompt)
            params_ = sampling_params(
                params,
                self.defaults,
                prompt_len=len(ids),
                max_model_len=self.max_model_len,
                max_n=self.max_n,
            )
            (engine_input,) = await self.engine.renderer.render_cmpl_async([{"prompt_token_ids": ids}])
        except (QwenRequestError, VLLMClientError) as exc:
            yield error_chunk(str(exc), getattr(exc, "code", PARAM_OUT_OF_RANGE))
            return
        chunks = ChunkBuilder(
            prompt,
            ids,
            n=params_.n,
            echo=bool(params.get("echo", True)),
            logprobs=params_.logprobs,
            first_token=self.tokenizer.decode(ids[:1]) if params_.prompt_logprobs is not None else "",
        )
        try:
            lora = self.adapters().get(params.get("model"))  # a request for an adapter's name runs it
            request_id = f"fastchat-{uuid.uuid4().hex}"
            async for out in self.engine.generate(engine_input, params_, request_id, lora_request=lora):
                data = chunks.update(out)
                if data is not None:
                    yield data
        except Exception as exc:  # FastChat reports every failure in-band
            if isinstance(exc, VLLMClientError):
                yield error_chunk(str(exc), PARAM_OUT_OF_RANGE)
            else:
                yield error_chunk(f"{SERVER_ERROR_MSG}\n\n({type(exc).__name__}: {exc})", INTERNAL_ERROR)

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        """The last chunk (fschat's /worker_generate)."""
        last: dict[str, Any] = error_chunk("the engine produced no output", INTERNAL_ERROR)
        async for last in self.generate_stream(params):
            pass
        return last


# -- HTTP routes ----------------------------------------------------------------------

router = APIRouter()


def _worker(request: Request) -> FastChatWorker:
    return request.app.state.fastchat_worker


async def _params(request: Request) -> dict[str, Any]:
    try:
        params = json_body(await request.body())
    except ValueError as exc:
        raise WorkerRequestError(str(exc), VALIDATION_TYPE_ERROR) from exc
    if not isinstance(params, dict):
        raise WorkerRequestError("request body must be a JSON object of gen params", VALIDATION_TYPE_ERROR)
    return params


async def _one_error(exc: WorkerRequestError) -> AsyncIterator[bytes]:
    yield frame(error_chunk(str(exc), exc.code))


@router.post("/worker_generate_stream")
async def worker_generate_stream(request: Request) -> StreamingResponse:
    try:
        params = await _params(request)
    except WorkerRequestError as exc:
        return StreamingResponse(_one_error(exc))

    async def frames() -> AsyncIterator[bytes]:
        async for data in _worker(request).generate_stream(params):
            yield frame(data)

    return StreamingResponse(frames())


@router.post("/worker_generate")
async def worker_generate(request: Request) -> JSONResponse:
    try:
        params = await _params(request)
    except WorkerRequestError as exc:
        return JSONResponse(error_chunk(str(exc), exc.code))
    return JSONResponse(await until_disconnect(request, _worker(request).generate(params)))


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness for load balancers and the stack (``/health`` stays vLLM's
    liveness): 200 once the engine can generate, 503 with the reason when it
    is dead. While the engine loads nothing listens on the port yet."""
    problem = await _worker(request).ready()
    if problem is not None:
        return error_response(f"not ready: {problem}", 503, headers={"Retry-After": "5"})
    return JSONResponse({"ready": True})


@router.post("/worker_get_status")
async def worker_get_status(request: Request) -> dict[str, Any]:
    return _worker(request).status()


@router.post("/count_token")
async def count_token(request: Request) -> dict[str, Any]:
    try:
        return {"count": len(_worker(request).prompt_ids((await _params(request)).get("prompt"))), "error_code": 0}
    except WorkerRequestError as exc:
        return {"count": 0, **error_chunk(str(exc), exc.code)}


@router.post("/worker_get_conv_template")
async def worker_get_conv_template(request: Request) -> dict[str, Any]:
    return {"conv": _worker(request).conv}


@router.post("/model_details")
async def model_details(request: Request) -> dict[str, Any]:
    return {"context_length": _worker(request).max_model_len}


def close_open_responses_on_stop(app: FastAPI) -> None:
    """On SIGTERM vLLM stops the engine (draining with --shutdown-timeout, else
    aborting) and only then the HTTP server, which by default waits forever for
    open responses: a stream whose engine is gone would never end. Give them
    ENGINE_STOPPED_GRACE_S to flush, then close them."""
    server = getattr(app.state, "server", None)  # vLLM's uvicorn server, set before start-up
    if server is not None and server.config.timeout_graceful_shutdown is None:
        server.config.timeout_graceful_shutdown = ENGINE_STOPPED_GRACE_S


class FastChatWorkerPlugin:
    """vLLM endpoint plugin: FastChat worker routes + controller registration."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)  # not on vLLM's render-only server (no engine)

    def __init__(self) -> None:
        self.link: ControllerLink | None = None
        self.limits: dict[str, Any] = {}  # what RequestChecks checks against, known once the engine is up
        self.gate = Gate()  # admission limit, known once the engine is up

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        # vLLM's --api-key guards only /v1-style prefixes; with a key, guard
        # every route (FastChat's, /health, /metrics, /tokenize, /invocations, ...).
        args = app.state.args
        app.add_middleware(Admission, gate=self.gate)  # innermost: counts only requests that passed the checks
        app.add_middleware(OpenAIRouteErrors)  # unknown routes: OpenAI-shaped 404/405
        app.add_middleware(RequestChecks, limits=self.limits)
        app.add_middleware(BodyLimit, limit=int(getattr(args, "max_body_mb", DEFAULT_MAX_BODY_MB) * 2**20))
        if keys := api_keys(args):
            app.add_middleware(ApiKeys, keys=keys, open_paths=OPEN_PATHS)
        # vLLM gives plugins no shutdown hook: stop the controller link when
        # the server's lifespan ends.
        serve = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
            close_open_responses_on_stop(app_)
            async with serve(app_) as state:
                try:
                    yield state
                finally:
                    if self.link is not None:
                        await self.link.stop()

        app.router.lifespan_context = lifespan

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        settings = WorkerSettings.from_args(args)
        worker = FastChatWorker(engine_client, settings, self.gate, getattr(state, "openai_serving_models", None))
        lora = engine_client.vllm_config.lora_config
        self.limits.update(
            max_n=worker.max_n, model=engine_client.model_config.model, max_lora_rank=lora.max_lora_rank if lora else None
        )
        state.fastchat_worker = worker
        if settings.controller_address:
            self.link = ControllerLink(
                settings.controller_address,
                settings.worker_address,
                worker.status,
                settings.local_ready_url,
                local_api_key=settings.api_key,
            )
            self.link.start()
