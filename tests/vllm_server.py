"""The real ``python -m vllm.entrypoints.openai.api_server`` process (the
session's, in conftest) and the official ``openai`` SDK as its client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from qwen_vllm.runtime.ports import free_port

REPO = Path(__file__).resolve().parent.parent
GREEDY = {"temperature": 0, "max_tokens": 200}


VLLM_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def launch_server(model: Path, name: str, log_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """vLLM's own server on ``model``; (process, base URL) once healthy."""
    port = free_port()
    log_path = log_dir / f"openai-server-{name}.log"
    cmd = [
        *VLLM_SERVER, "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "2048", "--dtype", "float32", *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    pytest.fail(f"{name} server not healthy after 900 s:\n{log_path.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


STOP_PROMPT = "Count to two:"


def make_chat_and_stop_model(out: Path) -> Path:
    """The scripted chat fixture plus one more scripted reply, to STOP_PROMPT
    (a raw completion prompt): " one", <|im_start|>, " two", <|im_end|>."""
    from qwen_vllm.checkpoints import fixtures
    from qwen_vllm.plugin.tokenizer import IM_END_ID, IM_START_ID, load_encoding

    if (out / "config.json").exists():
        return out
    vocab = str(fixtures.qwen_tiktoken_path())
    enc = load_encoding(vocab)
    steps = fixtures.plan_script(fixtures.SCRIPT, vocab)
    keys = {(s.prev, s.cur) for s in steps}
    prev, cur = enc.encode(STOP_PROMPT)[-2:]
    for nxt in [*enc.encode(" one"), IM_START_ID, *enc.encode(" two"), IM_END_ID]:
        assert (prev, cur) not in keys, "the stop script collides with the fixture's script"
        keys.add((prev, cur))
        steps.append(fixtures.ScriptStep(prev, cur, nxt))
        prev, cur = cur, nxt
    cfg, weights = fixtures.scripted_weights(steps, fixtures.tool_marker(vocab))
    return fixtures.write_checkpoint(out, cfg, weights)


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


