"""Small HTTP helpers shared by the worker routes and the OpenAI front."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

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


def openai_error(message: str, status: int, err_type: str, code: Any = None) -> dict[str, Any]:
    """An error body in the shape vLLM's and OpenAI's servers use."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": status if code is None else code}}
