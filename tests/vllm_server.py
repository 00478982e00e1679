"""A real ``python -m vllm.entrypoints.openai.api_server`` per test module,
and the official ``openai`` SDK as its client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from qwen_vllm.runtime.ports import free_port

REPO = Path(__file__).resolve().parent.parent
GREEDY = {"temperature": 0, "max_tokens": 200}


@pytest.fixture(scope="module")
def start_server(artifacts_dir: Path) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(model: Path, name: str, *flags: str) -> str:
        port = free_port()
        log_path = artifacts_dir / f"openai-server-{name}.log"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", "2048", "--dtype", "float32", *flags,
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{name} server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"{name} server not healthy after 900 s:\n{log_path.read_text()[-4000:]}")

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def client_for(base: str) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    return client, client.models.list().data[0].id


def stream_chat(client, **kw) -> tuple[str, list, str | None]:
    """(content, tool-call deltas, finish_reason) of a streamed chat completion."""
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return content, calls, finish


