"""The README's first command: `make demo` runs `qwen-vllm demo`.

Its --smoke mode is the same code path (fixture build, the whole stack with the
web UI, one streamed reply through the OpenAI SDK) stopped after the reply, so
this test proves the demo comes up and answers correctly, then leaves nothing
running. The model is served under the alias a client of Qwen's openai_api.py
sends (``--model-names Qwen,...``, a stack flag), and the reply is asked of
``model="Qwen"`` through the front."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY
from qwen_vllm.runtime.ports import free_ports


def test_demo_brings_up_the_stack_and_answers(tmp_path: Path) -> None:
    base = free_ports(4)
    cmd = [
        sys.executable, "-m", "qwen_vllm.serving.demo", "--smoke", "--model-dir", str(tmp_path / "demo-model"),
        "--model-names", "Qwen,qwen-scripted-chat",
        "--controller-port", str(base), "--worker-port", str(base + 1),
        "--port", str(base + 2), "--web-port", str(base + 3), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "writing the scripted Qwen v1 fixture" in log
    assert f"web UI       http://127.0.0.1:{base + 3}" in log
    assert "models: Qwen, qwen-scripted-chat" in log  # the stack waited for both names
    assert f"[demo] A: {CHAT_REPLY}" in log  # asked of model="Qwen" (the first name)
    assert "[stack] stopped" in log
    leftovers = [
        p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and str(tmp_path) in " ".join(p.info["cmdline"])
    ]  # fmt: skip
    assert not leftovers, leftovers
