"""A worker's link to the FastChat controller: register, heartbeat, re-register.

fschat's worker registers once with no retry (it crashes when the controller
is not up yet) and heartbeats from a thread. This link runs as one task on
the API server's event loop: it waits until the worker's own server answers,
registers (retrying with backoff while the controller is down), then sends a
heartbeat every ``FASTCHAT_WORKER_HEART_BEAT_INTERVAL`` seconds and registers
again when the controller answers ``exist: false`` (it was restarted), so a
restarted controller lists the worker again within one heartbeat -- or when
the names it serves changed (a LoRA adapter loaded or unloaded at run time).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import httpx

# Under vLLM's "vllm" logger so its handler (format, level) prints these.
logger = logging.getLogger("vllm.qwen_vllm.worker.registration")

MAX_BACKOFF_S = 5.0
REQUEST_TIMEOUT_S = 5.0


def heartbeat_interval() -> float:
    """FastChat's worker heartbeat interval (env FASTCHAT_WORKER_HEART_BEAT_INTERVAL)."""
    return float(os.environ.get("FASTCHAT_WORKER_HEART_BEAT_INTERVAL", 45))


class ControllerLink:
    """Keeps ``worker_address`` registered with the controller at ``controller_address``."""

    def __init__(
        self,
        controller_address: str,
        worker_address: str,
        status: Callable[[], dict[str, Any]],
        local_ready_url: str,
        interval: float | None = None,
        local_api_key: str | None = None,
    ) -> None:
        self.controller = controller_address.rstrip("/")
        self.worker_address = worker_address
        self.status = status
        self.local_ready_url = local_ready_url
        self.local_headers = {"Authorization": f"Bearer {local_api_key}"} if local_api_key else {}
        self.interval = heartbeat_interval() if interval is None else interval
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._registered_names: list[str] = []

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, trust_env=False)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fastchat-controller-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        await self._retry("reach the worker's own server", self._serving, first_warning=20)
        await self._retry("register with the controller", self._register)
        while True:
            await asyncio.sleep(self.interval)
            exist = await self._retry("heartbeat", self._heartbeat)
            if not exist:
                logger.info("controller %s does not know this worker (restarted?); registering again", self.controller)
                await self._retry("register with the controller", self._register)
            elif (names := self.status()["model_names"]) != self._registered_names:
                logger.info("serving %s now; registering again", ", ".join(names))
                await self._retry("register with the controller", self._register)

    async def _retry(self, what: str, step: Callable[[], Any], first_warning: int = 1) -> Any:
        """Run ``step`` until it succeeds, backing off 0.25 s .. min(5 s, interval)."""
        delay, failures = 0.25, 0
        while True:
            try:
                return await step()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                failures += 1
                log = logger.warning if failures in (first_warning, 10 * first_warning) or failures % 60 == 0 else logger.debug
                log("could not %s (%s: %s); retrying", what, type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S, max(self.interval, 0.25))

    async def _serving(self) -> None:
        r = await self._client.get(self.local_ready_url, headers=self.local_headers)
        r.raise_for_status()

    async def _register(self) -> None:
        status = self.status()
        r = await self._client.post(
            self.controller + "/register_worker",
            json={
                "worker_name": self.worker_address,
                "check_heart_beat": True,
                "worker_status": status,
                "multimodal": False,
            },
        )
        r.raise_for_status()
        self._registered_names = status["model_names"]
        logger.info("registered %s with the FastChat controller %s", self.worker_address, self.controller)

    async def _heartbeat(self) -> bool:
        r = await self._client.post(
            self.controller + "/receive_heart_beat",
            json={"worker_name": self.worker_address, "queue_length": self.status()["queue_length"]},
        )
        r.raise_for_status()
        return bool(r.json()["exist"])
