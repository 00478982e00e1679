"""Talking to any OpenAI-compatible server (our stack's front, or plain vLLM's)
with the official ``openai`` SDK: URL normalisation, clients that fail fast,
the model list, and one-line explanations of failures for people.

Shared by the web UI and the CLI's ``--api`` mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

# Seconds to wait for a connection, and for each piece of a reply (a stream
# may run longer in total; it may not go silent for longer than this).
CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 300.0


def api_base_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> ``http://host:port/v1``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"API URL must look like http://HOST:PORT/v1, got {url!r}")
    return url if parts.path.endswith("/v1") else url + "/v1"


def _client_kwargs(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    return dict(
        base_url=api_base_url(url),
        api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        max_retries=0,  # a person is waiting: say what is wrong at once
    )


def make_client(url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> openai.OpenAI:
    return openai.OpenAI(**_client_kwargs(url, api_key, timeout))


def make_async_client(url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(**_client_kwargs(url, api_key, timeout))


def list_models(client: openai.OpenAI) -> list[str]:
    """Ids from GET /v1/models (empty when the server serves none yet)."""
    return [m.id for m in client.models.list().data]


def chat_messages(system: str, turns: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """OpenAI messages: the system prompt then the turns, as raw text.

    The system message is always sent, even empty, so the model gets exactly
    what the person set (as vLLMWrapper does), not a server-side default.
    """
    return [{"role": "system", "content": system}] + [{"role": t["role"], "content": t["content"]} for t in turns]


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)
    text = exc.response.text.strip() if exc.response is not None else ""
    return text[:500] or exc.message


def describe_api_error(exc: BaseException, url: str) -> str:
    """One sentence for a person: what failed, where, and what to try."""
    if isinstance(exc, openai.APITimeoutError):
        return f"The API at {url} did not answer in time ({exc.__class__.__name__}). Is the model overloaded or stuck?"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"Cannot reach the API at {url} ({cause}). Is the server running?"
    if isinstance(exc, openai.AuthenticationError):
        return f"The API at {url} refused the API key (HTTP 401): {_server_message(exc)}"
    if isinstance(exc, openai.NotFoundError):
        return f"The API at {url} answered HTTP 404: {_server_message(exc)}"
    if isinstance(exc, openai.APIStatusError):
        return f"The API at {url} answered HTTP {exc.status_code}: {_server_message(exc)}"
    if isinstance(exc, openai.APIError):
        return f"The API at {url} sent an error: {exc.message}"
    return f"{exc.__class__.__name__}: {exc}"
