"""The front's Dispatcher against the real FastChat controller (no engine): it
learns every replica the controller names, balances by requests in flight,
skips a worker marked down, names the models when one is unknown, and keeps
serving from what it learned while the controller is down."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastchat_helpers import start_controller

from qwen_vllm.runtime.ports import free_port
from qwen_vllm.serving import front
from qwen_vllm.serving.front import Dispatcher, NoWorker

W1, W2, OTHER = "http://127.0.0.1:9", "http://127.0.0.1:10", "http://127.0.0.1:11"


def register(controller: str, worker: str, model: str) -> None:
    status = {"model_names": [model], "speed": 1, "queue_length": 0}
    payload = {"worker_name": worker, "check_heart_beat": False, "worker_status": status, "multimodal": False}
    httpx.post(controller + "/register_worker", json=payload).raise_for_status()


def test_dispatch_over_replicas(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "ASK_S", 0.0)  # ask the controller (in the background) on every pick
    port = free_port()
    controller = f"http://127.0.0.1:{port}"
    proc = start_controller(port, tmp_path)
    try:
        for worker, model in ((W1, "m"), (W2, "m"), (OTHER, "other")):
            register(controller, worker, model)

        async def scenario() -> None:
            async with httpx.AsyncClient() as client:
                d = Dispatcher(controller, client)
                first = await d.pick("m", set())  # asked on the request's path: none known yet
                d.started(first)  # one request running there
                await d.settled()  # the background question found the other replica
                second = await d.pick("m", set())
                assert {first, second} == {W1, W2}  # the idle one chosen
                d.started(second)
                d.finished(first)
                assert await d.pick("m", set()) == first  # now the less busy one
                assert await d.pick("m", {first}) == second  # a worker already tried is skipped
                with pytest.raises(NoWorker, match="'nope' is not served here; available models: m, other") as info:
                    await d.pick("nope", set())
                assert info.value.status == 404
                with pytest.raises(NoWorker, match="no reachable worker for model 'other'") as info:
                    await d.pick("other", {OTHER})
                assert info.value.status == 503
                # Down: skipped (the controller is also told to re-poll, which drops
                # these fake workers; the pool still knows the live-looking one).
                d.mark_down(second)
                assert await d.pick("m", set()) == first
                proc.kill()
                proc.wait()
                assert await d.pick("m", set()) == first  # controller gone: the pool still serves
                await d.settled()
                with pytest.raises(NoWorker, match="controller .* is unreachable") as info:
                    await d.pick("never-seen", set())
                assert info.value.status == 503

        asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait()
