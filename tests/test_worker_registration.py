"""ControllerLink against the real FastChat controller (no engine needed):
a worker that starts before its controller registers once the controller is
up, and registers again after the controller restarts."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import httpx
import pytest
from fastchat_helpers import start_controller

from qwen_vllm.runtime.ports import free_port
from qwen_vllm.worker.registration import ControllerLink

INTERVAL = 1.0


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the worker's own /health
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def worker_health():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()


async def listed(controller: str, within: float) -> list[str]:
    """Poll /list_models until the worker's model shows up (or ``within`` passes)."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as client:
        while True:
            models = (await client.post(controller + "/list_models")).json()["models"]
            if models or time.monotonic() > deadline:
                return models
            await asyncio.sleep(0.05)


def test_registers_late_and_again_after_a_controller_restart(worker_health, tmp_path):
    port = free_port()
    controller = f"http://127.0.0.1:{port}"
    status = {"model_names": ["late-model"], "speed": 1, "queue_length": 0}

    async def scenario() -> None:
        link = ControllerLink(controller, "http://127.0.0.1:1", lambda: status, worker_health, interval=INTERVAL)
        link.start()
        try:
            await asyncio.sleep(2)  # the controller is not up yet: the link keeps retrying
            proc = await asyncio.to_thread(start_controller, port, tmp_path)
            try:
                assert await listed(controller, within=INTERVAL + 1) == ["late-model"]
                proc.kill()
                proc.wait()
                await asyncio.sleep(INTERVAL)  # a heartbeat fails meanwhile
                proc = await asyncio.to_thread(start_controller, port, tmp_path)
                assert await listed(controller, within=INTERVAL + 1) == ["late-model"]
            finally:
                proc.kill()
                proc.wait()
        finally:
            await link.stop()
        assert link._task.cancelled()

    asyncio.run(scenario())
