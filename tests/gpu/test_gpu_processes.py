"""Processes on CUDA: what vLLM's start method and process layout change.

On CUDA, vLLM starts its engine core (and TP workers) with ``fork`` unless
CUDA is already initialised in the parent (VLLM_WORKER_MULTIPROC_METHOD,
default "fork": vllm/envs.py, vllm/utils/system_utils.py), where the CPU
backend always spawns (vllm/platforms/cpu.py). A forked child inherits the
parent's modules as they are, so it does not run the plugin's per-process
set-up again (vllm/plugins/__init__.py: plugins_loaded). The tests here run
the real commands on the scripted fixture and check what users see:

* ``kill -9`` of ``qwen-vllm worker`` (alone, and as a worker of
  ``qwen-vllm stack``) gives its GPU memory back within 30 s: no orphaned
  engine process keeps it;
* Ctrl-C mid-reply in ``qwen-vllm chat --model DIR`` stops the reply and the
  next turn works (the engine survived), under fork and spawn;
* ChatML stops end replies with finish_reason "stop" under fork, spawn and
  ``qwen-vllm serve --api-server-count 2`` (API servers in spawned processes).

Each test starts its own processes; every process tree is killed at the end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from test_chat_ui import PROMPT, cli_do, cli_stop_a_long_reply, spawn_cli, start_process
from test_faults import gone
from vllm_server import (
    GREEDY,
    STOP_PROMPT,
    client_for,
    make_chat_and_stop_model,
    stream_chat,
)

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY

GIB = 2**30
FREED_WITHIN_S = 30
# Engine flags for every server here: float32 keeps the scripted fixture's
# reply exact; half the GPU makes the engine's share easy to see in NVML.
ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", "1024", "--dtype", "float32", "--gpu-memory-utilization", "0.5"]
STARTUP_S = 900


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (engine core, workers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def titles(procs: list[psutil.Process], marker: str) -> list[str]:
    """The command-line words containing ``marker`` of the live ``procs``
    (vLLM retitles its processes "VLLM::EngineCore", "VLLM::APIServer_0"...)."""
    found = []
    for proc in procs:
        try:
            found += [word for word in " ".join(proc.cmdline()).split() if marker in word]
        except psutil.Error:
            pass
    return found


def engine_processes(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if titles([p], "EngineCore")]


def qwen_vllm_cmd(*args: str) -> list[str]:
    """``qwen-vllm ARGS`` (the public command, whatever module implements it)."""
    return [sys.executable, "-m", "qwen_vllm.cli", *args]


def stop(proc: subprocess.Popen, procs: list[psutil.Process], reap: Callable[[list], None]) -> None:
    """SIGTERM the process group a test started, then kill whatever is left of
    ``procs`` (engine processes may have left the group)."""
    from qwen_vllm.bench.serving import stop_group

    if proc.poll() is None:
        stop_group(proc)
    reap(procs)


# -- kill -9 frees the GPU -----------------------------------------------------------------
def assert_freed_after_kill(
    victim: psutil.Process, procs: list[psutil.Process], baseline: int, gpu_memory_back: Callable[[int, float], int]
) -> None:
    """SIGKILL ``victim``; within 30 s every process of ``procs`` is gone and
    used GPU memory is back to ``baseline``."""
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    held = gpu_memory_back(baseline, FREED_WITHIN_S)
    left = gone(procs, within=max(0.0, FREED_WITHIN_S - (time.monotonic() - killed)))
    names = titles(left, "")
    assert held == 0, f"{held / GIB:.2f} GiB still in use {FREED_WITHIN_S} s after kill -9; processes left: {names}"
    assert left == [], f"processes outlived the kill -9 by {FREED_WITHIN_S} s: {names}"


def test_kill_9_worker_frees_gpu_memory(
    scripted_model: Path, tmp_path: Path, gpu_memory: Callable[[], int], gpu_memory_back: Callable[[int, float], int],
    reap: Callable[[list], None],
) -> None:  # fmt: skip
    """``qwen-vllm worker`` (FastChat worker = vLLM API server + engine core)
    killed with SIGKILL: its engine core must not outlive it holding the GPU."""
    from qwen_vllm.runtime.ports import free_port

    baseline = gpu_memory()
    port = free_port()
    cmd = qwen_vllm_cmd("worker", "--model-path", str(scripted_model), "--no-register", "--port", str(port), *ENGINE_FLAGS)
    proc = start_process(cmd, tmp_path / "worker.log", f"http://127.0.0.1:{port}/health", timeout=STARTUP_S)
    procs = tree(proc.pid)
    try:
        client, model = client_for(f"http://127.0.0.1:{port}")
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], **GREEDY)
        assert reply.choices[0].message.content == CHAT_REPLY  # the engine really serves
        held = gpu_memory() - baseline
        assert held >= GIB, f"the worker holds only {held / GIB:.2f} GiB: nothing to see freed"
        assert_freed_after_kill(procs[0], procs, baseline, gpu_memory_back)
    finally:
        stop(proc, procs, reap)


def test_kill_9_stack_worker_frees_gpu_memory(
    scripted_model: Path, tmp_path: Path, gpu_memory: Callable[[], int], gpu_memory_back: Callable[[int, float], int],
    reap: Callable[[list], None],
) -> None:  # fmt: skip
    """The worker of ``qwen-vllm stack`` killed with SIGKILL: its GPU memory
    comes back, and the stack (still running) reports the death."""
    from qwen_vllm.runtime.ports import free_ports

    baseline = gpu_memory()
    base = free_ports(3)
    log = tmp_path / "stack.log"
    cmd = qwen_vllm_cmd(
        "stack", "--model", str(scripted_model), "--port", str(base), "--controller-port", str(base + 1),
        "--worker-port", str(base + 2), "--log-dir", str(tmp_path / "logs"), "--", *ENGINE_FLAGS,
    )  # fmt: skip
    proc = start_process(cmd, log, f"http://127.0.0.1:{base + 2}/health", timeout=STARTUP_S)
    procs = tree(proc.pid)
    try:
        workers = [p for p in psutil.Process(proc.pid).children() if "--model-path" in p.cmdline()]
        assert len(workers) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children()]
        worker_procs = [workers[0], *workers[0].children(recursive=True)]
        assert gpu_memory() - baseline >= GIB
        assert_freed_after_kill(workers[0], worker_procs, baseline, gpu_memory_back)
        assert proc.poll() is None  # the stack itself lives on
        deadline = time.monotonic() + 10
        while "exited with code -9" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the stack did not report its worker's death"
            time.sleep(0.5)
    finally:
        stop(proc, procs, reap)


# -- Ctrl-C in the terminal chat --------------------------------------------------------
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ctrl_c_mid_reply_keeps_the_engine(
    method: str, scripted_model: Path, monkeypatch: pytest.MonkeyPatch, reap: Callable[[list], None]
) -> None:
    """``qwen-vllm chat --model``: Ctrl-C (SIGINT to the terminal's whole
    foreground process group) stops the reply, keeps what was shown, and the
    next turn gets a full reply from the same engine. vLLM's engine core
    shuts down on SIGINT, so its processes must not be in that group."""
    import pexpect

    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", method)
    child = spawn_cli("--model", str(scripted_model), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
                      timeout=STARTUP_S)  # fmt: skip
    procs: list[psutil.Process] = []
    try:
        child.expect_exact(PROMPT)
        procs = tree(child.pid)
        engine = engine_processes(procs)
        assert engine, titles(procs, "")  # the engine core runs in a process of its own
        child.timeout = 120
        cli_do(child, "hello", CHAT_REPLY)
        cli_do(child, ":clh", "conversation forgotten")
        cli_stop_a_long_reply(child, None)
        time.sleep(2)  # an engine core that got the SIGINT is gone by now
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine), "the engine core died on Ctrl-C"
        cli_do(child, "still there?", CHAT_REPLY)
        child.sendline(":exit")
        child.expect(pexpect.EOF, timeout=120)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)
        reap(procs)


# -- ChatML stops under each process layout ------------------------------------------------
SERVERS = {
    "fork": ({"VLLM_WORKER_MULTIPROC_METHOD": "fork"}, []),
    "spawn": ({"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, []),
    "api-server-count-2": ({}, ["--api-server-count", "2"]),
}


@pytest.fixture(scope="module")
def stops_model(fixtures_root: Path) -> Path:
    """The scripted chat fixture plus the CPU suite's raw-completion script
    (" one" <|im_start|> " two" <|im_end|>), to see the default stops."""
    return make_chat_and_stop_model(fixtures_root / "scripted-chat-stops")


@pytest.fixture(scope="module", params=list(SERVERS), ids=list(SERVERS))
def server(
    request: pytest.FixtureRequest, stops_model: Path, tmp_path_factory: pytest.TempPathFactory, reap: Callable[[list], None]
) -> Iterator[dict]:
    """``qwen-vllm serve`` (vLLM's API server + Qwen tool calling) in one layout."""
    from qwen_vllm.runtime.ports import free_port

    env, flags = SERVERS[request.param]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / f"serve-{request.param}.log"
    cmd = qwen_vllm_cmd("serve", "--model", str(stops_model), "--port", str(port), *ENGINE_FLAGS, *flags)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        proc = start_process(cmd, log, base + "/health", timeout=STARTUP_S)
    procs = tree(proc.pid)
    try:
        yield {"name": request.param, "base": base, "procs": procs}
    finally:
        stop(proc, procs, reap)


def test_chat_stops_at_im_end(server: dict) -> None:
    """The reply ends at the model's own <|im_end|>: finish_reason "stop",
    the text without the stop token, stream and non-stream."""
    client, model = client_for(server["base"])
    messages = [{"role": "user", "content": "Hi there"}]
    reply = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (CHAT_REPLY, "stop")
    assert stream_chat(client, model=model, messages=messages, **GREEDY) == (CHAT_REPLY, [], "stop")


def test_im_start_is_a_default_stop(server: dict) -> None:
    """<|im_start|> ends a raw completion with no stop settings: the plugin's
    default stops reached the process that builds each request's sampling
    parameters (the API server, spawned or not)."""
    from qwen_vllm.plugin.tokenizer import IM_START_ID

    client, model = client_for(server["base"])
    out = client.completions.create(model=model, prompt=STOP_PROMPT, **GREEDY)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (" one", "stop")
    assert getattr(out.choices[0], "stop_reason", None) == IM_START_ID


def test_concurrent_replies_all_stop(server: dict) -> None:
    """16 requests at once, each on a new connection (with two API servers
    the kernel spreads them over both): every reply complete and stopped."""
    import openai

    model = client_for(server["base"])[1]
    results: list[tuple[str | None, str | None]] = []

    def one() -> None:
        c = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], **GREEDY)
        results.append((r.choices[0].message.content, r.choices[0].finish_reason))
        c.close()

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [(CHAT_REPLY, "stop")] * 16


def test_api_server_layout(server: dict) -> None:
    """``--api-server-count 2`` runs two API server processes, which vLLM
    titles VLLM::APIServer_0 and _1 (vllm/v1/utils.py:
    run_api_server_worker_proc); without it the server is the one process
    started, and none is titled so."""
    want = {"VLLM::APIServer_0", "VLLM::APIServer_1"} if server["name"] == "api-server-count-2" else set()
    assert set(titles(tree(server["procs"][0].pid), "APIServer_")) == want
