"""Security, load and faults on the shared topology (reliability_stack.py).

Non-destructive tests first (binding, keys, code checks, concurrent load,
admission control),
then in order: the controller down and back, kill -9 of worker B mid-stream,
and SIGTERM to the front, worker A and the controller, each with a request in
flight. What test_fastchat_stack.py already proves (the stack restarting its
controller and a killed worker, 503 + Retry-After meanwhile, a crash loop
left down, stack shutdown) is not repeated.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from reliability_stack import (  # noqa: F401 (topology is a fixture)
    A_LIMIT,
    ADAPTERS,
    HEARTBEAT_S,
    MODEL,
    WORKER_KEY,
    topology,
)

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY, REMOTE_CODE_FILES

ROOT = Path(__file__).resolve().parent.parent
B_HEADERS = {"Authorization": f"Bearer {WORKER_KEY}"}
LONG = {"max_tokens": 600, "extra_body": {"min_tokens": 600}}  # min_tokens holds the ChatML stops back
LOOPBACK = {"127.0.0.1", "::1"}


def hello() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Hello"}]


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("key", "none"), max_retries=0, timeout=120, **kw)


def running_requests(url: str, headers: dict | None = None) -> float:
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{.*\} (\S+)$", text, re.M))


def finished_requests(url: str, headers: dict | None = None) -> float:
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", text, re.M))


def gone(procs: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Of ``procs``, those still alive (not zombies) after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# -- security ------------------------------------------------------------------------------


def test_every_server_listens_on_loopback_only(topology):
    """Worker and front started without --host; engine processes included."""
    for name in ("controller", "worker-a", "worker-b", "front"):
        listening = [
            c.laddr.ip
            for p in topology.tree(name)
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and set(listening) <= LOOPBACK, (name, listening)


def test_every_command_defaults_to_loopback():
    import argparse

    from qwen_vllm.serving import front, stack
    from qwen_vllm.serving.serve import with_loopback_default
    from qwen_vllm.ui import web

    for module, argv in ((front, []), (stack, ["--model", "m"]), (web, ["--api-url", "u"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.parse_args(argv).host == "127.0.0.1", module.__name__
    assert with_loopback_default(["--model", "m"])[-2:] == ["--host", "127.0.0.1"]
    assert with_loopback_default(["--host", "0.0.0.0"]) == ["--host", "0.0.0.0"]


def worker_routes(topology) -> list[tuple[str, str]]:
    """Every (method, path) worker A's app serves (its OpenAPI schema), plus the
    routes the schema leaves out."""
    schema = httpx.get(topology.worker_url("a") + "/openapi.json", timeout=10).json()
    routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if "{" not in p}
    return sorted(routes | {("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs")})


def test_worker_api_key_guards_every_route(topology):
    routes = worker_routes(topology)
    assert {("POST", "/worker_generate_stream"), ("POST", "/v1/chat/completions"), ("POST", "/invocations")} <= set(routes)
    url = topology.worker_url("b")
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": WORKER_KEY}):
            r = httpx.request(method, url + path, headers=headers, json={}, timeout=30)
            if path == "/worker_get_status":  # the FastChat controller polls it and sends no key
                assert r.status_code == 200 and r.json()["model_names"] == [MODEL, *ADAPTERS]
            elif path == "/ready":  # load balancers probe it with no key; it tells only "ready"
                assert r.status_code == 200 and r.json() == {"ready": True}
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code)
    assert httpx.get(url + "/health", headers=B_HEADERS, timeout=10).status_code == 200
    r = client(url, key=WORKER_KEY).chat.completions.create(model=MODEL, messages=hello(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY


def test_front_api_keys_guard_every_route():
    """In process (no worker needed): every route of the front's app, including
    FastAPI's own docs and unknown paths, answers 401 without the key."""
    from qwen_vllm.serving.front import create_app

    app = create_app("http://127.0.0.1:9", api_keys=["k1", "k2"])
    paths = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) or ("GET",) if m != "HEAD"}
    paths |= {("GET", "/nope"), ("POST", "/v1/embeddings")}
    assert {("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/docs")} <= paths

    async def check() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as c:
            for method, path in sorted(paths):
                path = path.replace("{model:path}", "m")
                for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
                    r = await c.request(method, path, headers=headers)
                    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path)
            for key in ("k1", "k2"):
                assert (await c.get("/health", headers={"Authorization": f"Bearer {key}"})).status_code == 200

    asyncio.run(check())


CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}
UNSAFE_MODULES = {"pickle", "marshal", "dill", "shelve", "cloudpickle"}
UNSAFE_ATTRS = {("os", "system"), ("os", "popen"), ("yaml", "load"), ("yaml", "unsafe_load")}


def test_no_eval_of_user_input():
    """Nowhere in qwen_vllm: eval/exec/compile/__import__, a deserializer that
    runs code (pickle & co.), os.system/popen, yaml.load, or shell=True."""
    found = []
    for path in sorted((ROOT / "qwen_vllm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{where} import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in CODE_BUILTINS:
                found.append(f"{where} {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in UNSAFE_ATTRS or (func.value.id == "builtins" and func.attr in CODE_BUILTINS):
                    found.append(f"{where} {func.value.id}.{func.attr}()")
            for k in node.keywords:
                if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append(f"{where} shell=")
    assert not found, found


def test_qwen_needs_no_remote_code(topology, scripted_model):
    """The workers run without --trust-remote-code on a checkpoint whose remote
    code files raise if imported, and serve the scripted reply."""
    assert all((scripted_model / f).is_file() for f in REMOTE_CODE_FILES)
    for name in ("worker-a", "worker-b"):
        assert not any("trust" in arg for arg in topology.procs[name].args), name
    r = client(topology.worker_url("a")).chat.completions.create(model=MODEL, messages=hello(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY


# -- load ----------------------------------------------------------------------------------


def test_concurrent_streams_through_the_front(topology):
    """24 clients x 3 streamed greedy requests at once: none lost or failed, every
    reply equals the single-request reply, and both workers (B with its key) took some."""
    clients, rounds = 24, 3
    before = (finished_requests(topology.worker_url("a")), finished_requests(topology.worker_url("b"), B_HEADERS))
    single = client(topology.front_url).chat.completions.create(model=MODEL, messages=hello(), temperature=0)
    assert single.choices[0].message.content == CHAT_REPLY

    async def one(c: openai.AsyncOpenAI) -> str:
        stream = await c.chat.completions.create(model=MODEL, messages=hello(), temperature=0, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def run() -> list[str | BaseException]:
        async with openai.AsyncOpenAI(base_url=topology.front_url + "/v1", api_key="none", max_retries=0, timeout=300) as c:

            async def client_loop() -> list[str]:
                return [await one(c) for _ in range(rounds)]

            results = await asyncio.gather(*(client_loop() for _ in range(clients)), return_exceptions=True)
        return [r for rs in results for r in (rs if isinstance(rs, list) else [rs])]

    replies = asyncio.run(run())
    assert len(replies) == clients * rounds
    assert [r for r in replies if r != single.choices[0].message.content] == []
    after = (finished_requests(topology.worker_url("a")), finished_requests(topology.worker_url("b"), B_HEADERS))
    assert all(a > b for a, b in zip(after, before)), (before, after)


def queue_length(url: str) -> int:
    return httpx.post(url + "/worker_get_status", timeout=10).json()["queue_length"]


def test_full_worker_refuses_with_429_and_the_front_uses_the_other(topology):
    """A_LIMIT long streams fill worker A (--limit-worker-concurrency): its /v1
    answers 429 + Retry-After (refused, not queued) and its FastChat route the in-band
    ENGINE_OVERLOADED error; every request through the front is served (by B,
    after A's 429); A stays ready and serves again once the streams end."""
    a_url = topology.worker_url("a")
    log = topology.log_dir / "worker-a.log"
    mark = log.stat().st_size
    release = threading.Event()
    streams_ended, failed = [], []

    def hold() -> None:
        try:
            stream = client(a_url).chat.completions.create(model=MODEL, messages=hello(), stream=True, **LONG)
            for _ in stream:
                if release.is_set():
                    break
            stream.close()
        except Exception as exc:  # a stream that never arrives or breaks: say why in the failure
            failed.append(repr(exc))
            raise
        streams_ended.append(1)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(A_LIMIT)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while queue_length(a_url) < A_LIMIT:
            assert time.monotonic() < deadline, f"A holds {queue_length(a_url)} requests, not {A_LIMIT}; {failed}"
            time.sleep(0.1)
        with pytest.raises(openai.RateLimitError) as info:
            client(a_url).chat.completions.create(model=MODEL, messages=hello(), max_tokens=4)
        assert info.value.response.headers["retry-after"] == "1"
        assert f"{A_LIMIT} requests running or queued on this worker, its limit is {A_LIMIT};" in info.value.message
        inband = httpx.post(a_url + "/worker_generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=10).json()
        assert inband["error_code"] == 42903 and inband["text"].startswith("server busy"), inband  # ENGINE_OVERLOADED
        with httpx.stream("POST", a_url + "/worker_generate_stream", json={"prompt": "hi"}, timeout=10) as r:
            frames = [f for f in r.read().split(b"\0") if f]
        assert len(frames) == 1 and b"42903" in frames[0]
        front = client(topology.front_url)
        for _ in range(4):
            r = front.chat.completions.create(model=MODEL, messages=hello(), temperature=0)
            assert r.choices[0].message.content == CHAT_REPLY
        assert httpx.get(a_url + "/ready", timeout=10).json() == {"ready": True}  # full is not unready
    finally:
        release.set()
        for t in threads:
            t.join(timeout=120)
    assert len(streams_ended) == A_LIMIT
    refused = [line for line in log.read_bytes()[mark:].decode(errors="replace").splitlines() if '" 429' in line]
    assert len(refused) >= 3, refused  # the direct request, then the front's tries on A
    deadline = time.monotonic() + 30
    while queue_length(a_url) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client(a_url).chat.completions.create(model=MODEL, messages=hello(), temperature=0).choices[0].message.content == CHAT_REPLY


# -- faults (destructive, in this order) ---------------------------------------------------


def test_controller_down_then_back(topology):
    front = client(topology.front_url)
    front.models.list()  # cache the model list
    topology.procs["controller"].kill()
    topology.procs["controller"].wait()
    # Workers keep serving their own /v1, the front keeps serving the workers it knows.
    r = client(topology.worker_url("a")).chat.completions.create(model=MODEL, messages=hello(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY
    r = front.chat.completions.create(model=MODEL, messages=hello(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY
    assert sorted(m.id for m in front.models.list().data) == sorted([MODEL, *ADAPTERS])  # last known list
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        front.chat.completions.create(model="never-seen", messages=hello())
    assert info.value.status_code == 503 and "controller" in info.value.message and "unreachable" in info.value.message
    assert time.monotonic() - start < 10
    # Back: both workers re-register within one heartbeat of the controller answering.
    topology.start_controller()
    up = time.monotonic()
    while sorted(topology.controller_models()) != sorted([MODEL, *ADAPTERS]):
        assert time.monotonic() - up < HEARTBEAT_S + 3, "workers did not re-register"
        time.sleep(0.1)
    for _ in range(4):
        address = httpx.post(topology.controller_url + "/get_worker_address", json={"model": MODEL}).json()["address"]
        assert address in (topology.worker_url("a"), topology.worker_url("b"))
    with pytest.raises(openai.NotFoundError, match="'never-seen' is not served here"):
        front.chat.completions.create(model="never-seen", messages=hello())


def test_kill_9_worker_mid_stream(topology):
    """Two long streams through the front, one on each worker; worker B gets
    SIGKILL. Its stream ends with an error at once, A's finishes, B's engine
    process does not outlive it, and the controller stops naming B."""
    a_url, b_url = topology.worker_url("a"), topology.worker_url("b")
    b_tree = topology.tree("worker-b")
    front = client(topology.front_url)
    results: dict[int, object] = {}
    progress = [0, 0]

    def stream(i: int) -> None:
        text = ""
        try:
            for chunk in front.chat.completions.create(model=MODEL, messages=hello(), stream=True, temperature=0, **LONG):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                progress[i] += 1
            results[i] = ("done", len(text), time.monotonic())
        except openai.APIError as exc:
            results[i] = ("error", str(exc), time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    deadline = time.monotonic() + 120
    while min(progress) < 5:
        assert time.monotonic() < deadline and not results, (progress, results)
        time.sleep(0.1)
    assert running_requests(a_url) == 1 and running_requests(b_url, B_HEADERS) == 1  # one on each
    topology.procs["worker-b"].kill()
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    outcomes = sorted(results.values(), key=lambda r: r[0])
    (done, length, _), (error, message, ended) = outcomes
    assert done == "done" and length > 0
    assert error == "error" and "stopped mid-stream" in message and ended - killed < 5, outcomes
    assert gone(b_tree, within=15) == [], "worker B's processes outlived it"
    # The front told the controller to re-poll its workers: B is dropped at once.
    deadline = time.monotonic() + 15
    while True:
        named = {httpx.post(topology.controller_url + "/get_worker_address", json={"model": MODEL}).json()["address"] for _ in range(4)}
        if named == {a_url}:
            break
        assert time.monotonic() < deadline, named
        time.sleep(0.5)
    for _ in range(4):
        assert front.chat.completions.create(model=MODEL, messages=hello(), temperature=0).choices[0].message.content == CHAT_REPLY


def sigterm_with_stream_in_flight(topology, name: str, url: str, bound: float) -> float:
    """SIGTERM ``name`` while a long stream from ``url`` runs; seconds until the
    stream ended and every process of ``name`` exited (asserted within ``bound``)."""
    tree = topology.tree(name)
    flowing, ended = threading.Event(), threading.Event()

    def stream() -> None:
        try:
            for _ in client(url).chat.completions.create(model=MODEL, messages=hello(), stream=True, **LONG):
                flowing.set()
        except openai.APIError:
            pass  # cut off: acceptable, hanging is not
        ended.set()

    threading.Thread(target=stream, daemon=True).start()
    # Its first chunk has arrived (a /metrics poll can come back late on a loaded machine).
    assert flowing.wait(60), "the stream did not start"
    assert not ended.is_set(), "the stream ended before the signal: nothing was in flight"
    start = time.monotonic()
    topology.procs[name].send_signal(signal.SIGTERM)
    assert ended.wait(bound), f"{name}: the in-flight stream did not end within {bound} s of SIGTERM"
    assert gone(tree, within=bound - (time.monotonic() - start)) == [], f"{name}: processes left after {bound} s"
    return time.monotonic() - start


def test_sigterm_front_then_worker_then_controller(topology):
    a_url = topology.worker_url("a")
    # Front: in-flight streams get its 10 s grace, then are closed; A aborts the request.
    sigterm_with_stream_in_flight(topology, "front", topology.front_url, bound=20)
    deadline = time.monotonic() + 15
    while running_requests(a_url) > 0:
        assert time.monotonic() < deadline, "worker A still runs the request the front dropped"
        time.sleep(0.2)
    # Worker A: its stream ends and the API server and engine processes exit.
    sigterm_with_stream_in_flight(topology, "worker-a", a_url, bound=30)
    # Controller.
    proc = topology.procs["controller"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) is not None
    assert all(p.poll() is not None for p in topology.procs.values())


def test_ctrl_c_while_an_engine_loads_ends_the_stack_within_10_s(scripted_model, tmp_path):
    """Ctrl-C (SIGINT to the stack) before its worker's engine is up: every
    process of the stack, engine processes included, is gone within 10 s."""
    from qwen_vllm.runtime.ports import free_ports

    base = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_vllm.cli", "stack", "--model", str(scripted_model), "--port", str(base),
         "--controller-port", str(base + 1), "--worker-port", str(base + 2), "--log-dir", str(tmp_path),
         "--", "--enforce-eager", "--max-model-len", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stack = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while not any("EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM") for p in stack.children(True)):
            assert proc.poll() is None and time.monotonic() < deadline, "no engine process started"
            time.sleep(0.2)
        family = [stack, *stack.children(recursive=True)]
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        left = gone(family, within=10)
        assert not left, f"still running {time.monotonic() - start:.0f} s after Ctrl-C: {[p.pid for p in left]}"
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
