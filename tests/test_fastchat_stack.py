"""The FastChat topology end to end, real processes on 127.0.0.1.

One ``qwen-vllm demo`` for the module (the README's first command: it writes
the scripted fixture, runs ``qwen-vllm stack --web`` on it and asks it one
question), given a second model and an API key: the real FastChat
controller, two workers (the scripted fixture served as "scripted-chat" — no
"qwen" in its name — and the random fixture as "random"), the OpenAI front
and the web UI; driven by the official openai SDK and by raw FastChat worker
requests. Destructive tests (controller restart, kill -9 and the restart,
a crash loop, shutdown) run last, in that order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY
from qwen_vllm.runtime.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-fastchat"
HEARTBEAT_S = 2  # FastChat parses it with int()
CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
)


class StackProcess:
    """``qwen-vllm demo`` (the fixture written to ``demo_dir``) with ``models``
    beside it, run as a user would; URLs and pids from its ready file, its
    output kept for what it tells a person."""

    def __init__(self, demo_dir: Path, models: list[Path], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = log_dir / "ready.json"
        self.ready_file.unlink(missing_ok=True)
        base = free_ports(5)
        self.front_port, self.controller_port, self.worker_port, self.web_port = base, base + 1, base + 2, base + 4
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(HEARTBEAT_S)}
        cmd = [sys.executable, "-m", "qwen_vllm.cli", "demo", "--model-dir", str(demo_dir), "--port", str(base),
               "--controller-port", str(base + 1), "--worker-port", str(base + 2), "--web-port", str(base + 4),
               "--api-keys", KEY, "--log-dir", str(log_dir), "--ready-file", str(self.ready_file),
               "--max-queued-requests", "4"]  # fmt: skip
        for m in models:
            cmd += ["--model", str(m)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with open(self.ready_file.with_name("stack.out"), "a", encoding="utf-8") as copy:  # kept for a person
            for line in self.proc.stdout:
                copy.write(line)
                copy.flush()
                with self.changed:
                    self.lines.append(line.rstrip("\n"))
                    self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[start:]:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no line matching {pattern!r}; stack output:\n" + "\n".join(self.lines))
                self.changed.wait(min(left, 1.0))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the stack did not become ready; output:\n" + "\n".join(self.lines))
            time.sleep(0.5)

    def info(self) -> dict:
        return json.loads(self.ready_file.read_text())

    def pids(self) -> dict[str, int]:
        """Latest pid of each role, e.g. {"controller": 1, "worker random#0": 2, "openai-api": 3}."""
        info = self.info()
        return {r["name"]: r["pid"] for r in (info["controller"], info["front"], *info["workers"])}


def test_demo_passes_stack_flags_whole() -> None:
    """``qwen-vllm demo --model X``: X is another model for the stack, not an
    abbreviation of the demo's own --model-dir (no engine)."""
    from qwen_vllm import cli
    from qwen_vllm.serving.demo import DEFAULT_DIR

    argv = ["demo", "--model", "x", "--model-names", "Qwen"]
    parser, _ = cli.build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    assert args.model_dir == DEFAULT_DIR and extra == ["--model", "x", "--model-names", "Qwen"]


@pytest.fixture(scope="module")
def stack(random_model, artifacts_dir, tmp_path_factory):
    s = StackProcess(tmp_path_factory.mktemp("demo") / "scripted-chat", [random_model], artifacts_dir / "fastchat-stack")
    try:
        s.wait_ready(timeout=900)
        s.descendants = {p.pid for p in psutil.Process(s.proc.pid).children(recursive=True)}
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGINT)
            try:
                s.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                s.proc.kill()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.front_port}/v1", api_key=KEY, max_retries=0, timeout=120)


def worker_url(stack, name: str) -> str:
    return next(w["url"] for w in stack.info()["workers"] if w["name"] == f"worker {name}#0")


def messages(text: str = "Hello") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_demo_wrote_its_fixture_and_answered(stack):
    """What the demo adds to the stack: its fixture, the web UI, and one
    streamed reply through the OpenAI SDK, asked of the fixture's model."""
    stack.wait_line(r"^\[demo\] writing the scripted Qwen v1 fixture to ", timeout=1)
    stack.wait_line(rf"^  web UI       http://127\.0\.0\.1:{stack.web_port}", timeout=1)
    stack.wait_line(r"^  OpenAI API   .*   models: random, scripted-chat$", timeout=1)
    stack.wait_line(rf"^\[demo\] A: {re.escape(CHAT_REPLY)}$", timeout=120)
    assert httpx.get(f"http://127.0.0.1:{stack.web_port}", timeout=10).status_code == 200


def test_models_and_api_keys(stack, client):
    info = stack.info()
    assert all(r["ready"] for r in (info["controller"], info["front"], *info["workers"])), info
    assert sorted(m.id for m in client.models.list().data) == ["random", "scripted-chat"]
    assert client.models.retrieve("random").id == "random"
    front = f"http://127.0.0.1:{stack.front_port}"
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/health")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, front + path, headers=headers, json={"model": "random"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="scripted-chat", messages=messages())


def test_chat_non_stream_and_stream(client):
    r = client.chat.completions.create(model="scripted-chat", messages=messages(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="scripted-chat", messages=messages(), temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions(client):
    r = client.completions.create(model="scripted-chat", prompt=CHATML_PROMPT, max_tokens=100, temperature=0)
    assert r.choices[0].text == CHAT_REPLY and r.choices[0].finish_reason == "stop"
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="scripted-chat", prompt=CHATML_PROMPT, max_tokens=100, temperature=0, stream=True
        )
    )
    assert text == CHAT_REPLY


def test_unknown_model_and_bad_body(stack, client):
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here; available models: random, scripted-chat"):
        client.chat.completions.create(model="gpt-4", messages=messages())
    r = httpx.post(
        f"http://127.0.0.1:{stack.front_port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        content=b"not json",
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # Errors of the worker itself are relayed unchanged.
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="scripted-chat", messages=messages(), temperature=9)


def fastchat_stream(url: str, params: dict) -> list[dict]:
    """POST /worker_generate_stream and split FastChat's \\0-framed chunks."""
    with httpx.stream("POST", url + "/worker_generate_stream", json=params, timeout=120) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_raw())
    assert body.endswith(b"\0")
    return [json.loads(frame) for frame in body.split(b"\0") if frame]


def test_gradio_shaped_request_streams_the_reply(stack):
    # Exactly what fschat's gradio_web_server sends: no top_k, echo false.
    params = {
        "model": "scripted-chat",
        "prompt": CHATML_PROMPT,
        "temperature": 0.7,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 1024,
        "stop": "<|endoftext|>",
        "stop_token_ids": [151643, 151644, 151645],
        "echo": False,
    }
    chunks = fastchat_stream(worker_url(stack, "scripted-chat"), params)
    assert len(chunks) > 3 and all(c["error_code"] == 0 for c in chunks)
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, never retracted
    assert texts[-1] == CHAT_REPLY
    assert [c["finish_reason"] for c in chunks].count(None) == len(chunks) - 1  # final chunk sent once
    assert chunks[-1]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == 20 and usage["total_tokens"] == 20 + usage["completion_tokens"]


def test_fastchat_test_message_client(stack):
    """FastChat's own client, unchanged: ``python -m fastchat.serve.test_message``
    (it imports fastchat.model, hence accelerate). It picks FastChat's Qwen
    template from the model name, renders ChatML and streams the reply."""
    out = subprocess.run(
        [sys.executable, "-m", "fastchat.serve.test_message", "--worker-address", worker_url(stack, "scripted-chat"),
         "--model-name", "Qwen", "--message", "Hello", "--temperature", "0", "--max-new-tokens", "200"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "<|im_start|>assistant: " + CHAT_REPLY in out.stdout, out.stdout


def test_worker_api_endpoints(stack, qwen_tokenizer):
    from qwen_vllm.chat_template import render_messages

    url = worker_url(stack, "scripted-chat")
    assert httpx.post(url + "/worker_get_status").json() == {
        "model_names": ["scripted-chat"],
        "speed": 1,
        "queue_length": 0,
    }
    count = httpx.post(url + "/count_token", json={"prompt": CHATML_PROMPT}).json()
    assert count == {"count": len(render_messages(qwen_tokenizer, messages())), "error_code": 0}
    conv = httpx.post(url + "/worker_get_conv_template").json()["conv"]
    assert conv["name"] == "qwen-7b-chat" and conv["stop_token_ids"] == [151643, 151644, 151645]
    assert httpx.post(url + "/model_details").json() == {"context_length": 2048}
    final = httpx.post(url + "/worker_generate", json={"prompt": CHATML_PROMPT, "temperature": 0}, timeout=120).json()
    assert final["text"] == CHATML_PROMPT + CHAT_REPLY  # fschat's default echo=True
    bad = httpx.post(url + "/worker_generate", json={"prompt": CHATML_PROMPT, "top_k": 2.5}).json()
    assert bad["error_code"] == 40302 and "top_k must be an integer" in bad["text"]
    overflow = httpx.post(url + "/worker_generate", json={"prompt": "hi " * 3000}).json()
    assert overflow["error_code"] == 40303 and "2048" in overflow["text"]


def test_sampling_params_are_honoured(stack):
    scripted = worker_url(stack, "scripted-chat")
    rnd = worker_url(stack, "random")

    def gen(url, **params):
        out = httpx.post(url + "/worker_generate", json={"prompt": CHATML_PROMPT, "echo": False, **params}, timeout=120)
        return out.json()

    assert gen(scripted, temperature=0, repetition_penalty=1.0)["text"] == CHAT_REPLY
    assert gen(scripted, temperature=0, repetition_penalty=10.0, max_new_tokens=20)["text"] != CHAT_REPLY[:20]
    a, b, c = (gen(rnd, temperature=1.0, max_new_tokens=12, seed=s)["text"] for s in (11, 11, 12))
    assert a == b and a != c
    n3 = gen(rnd, temperature=1.0, max_new_tokens=6, n=3, seed=5)
    assert [ch["index"] for ch in n3["choices"]] == [0, 1, 2] and n3["text"] == n3["choices"][0]["text"]
    assert len({ch["text"] for ch in n3["choices"]}) == 3 and n3["usage"]["completion_tokens"] == 18
    three = gen(scripted, temperature=0, max_new_tokens=3, logprobs=1)
    lp = three["logprobs"]
    assert "".join(lp["tokens"]) == three["text"] and CHAT_REPLY.startswith(three["text"])
    assert len(lp["token_logprobs"]) == 3 and all(v <= 0 for v in lp["token_logprobs"])


def engine_counts(url: str) -> tuple[float, float]:
    """(requests running, requests finished by stop or length) from the worker's /metrics."""
    text = httpx.get(url + "/metrics").text
    running = sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{.*\} (\S+)$", text, re.M))
    done = sum(
        float(v) for v in re.findall(r'^vllm:request_success_total\{.*finished_reason="(?:stop|length)".*\} (\S+)$', text, re.M)
    )
    return running, done


def assert_aborted(url: str, done_before: float) -> None:
    """The long request left the engine without finishing (it was aborted)."""
    deadline = time.monotonic() + 10
    while engine_counts(url)[0] > 0:
        assert time.monotonic() < deadline, "request still running 10 s after the client left"
        time.sleep(0.2)
    assert engine_counts(url)[1] == done_before


def test_client_disconnect_aborts_the_vllm_request(stack, client):
    url = worker_url(stack, "random")
    long = {"max_new_tokens": 1500, "temperature": 1.0, "echo": False}
    _, done = engine_counts(url)
    with httpx.stream("POST", url + "/worker_generate_stream", json={"prompt": CHATML_PROMPT, **long}) as r:
        frames = r.iter_raw()
        for _ in range(3):
            next(frames)
        assert engine_counts(url)[0] == 1
    assert_aborted(url, done)
    # Through the front: closing the client's stream closes the upstream one.
    stream = client.chat.completions.create(model="random", messages=messages(), max_tokens=1500, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert_aborted(url, done)
    # Non-streaming through the front: the client gives up.
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1.5).chat.completions.create(model="random", messages=messages(), max_tokens=1500)
    assert_aborted(url, done)


def test_controller_restart_workers_return_within_one_heartbeat(stack, client):
    old = stack.pids()["controller"]
    mark = len(stack.lines)
    os.kill(old, signal.SIGKILL)
    # Meanwhile the front keeps serving from the workers the controller named.
    r = client.chat.completions.create(model="scripted-chat", messages=messages(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY
    stack.wait_line(r"^\[stack\] controller\s+pid (\d+)", timeout=30, start=mark)
    deadline = time.monotonic() + 5
    while stack.pids()["controller"] == old:  # the ready file follows the restart
        assert time.monotonic() < deadline, "the ready file still names the dead controller"
        time.sleep(0.1)
    controller = f"http://127.0.0.1:{stack.controller_port}"
    deadline = time.monotonic() + 60
    while True:  # the restarted controller answering is the start of the clock
        try:
            models = httpx.post(controller + "/list_models").json()["models"]
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    up = time.monotonic()
    while sorted(models) != ["random", "scripted-chat"]:
        assert time.monotonic() - up < HEARTBEAT_S + 2.0, f"workers not back within one heartbeat: {models}"
        time.sleep(0.1)
        models = httpx.post(controller + "/list_models").json()["models"]


@contextlib.contextmanager
def second_front(stack) -> Iterator[str]:
    """Another front on the stack's controller (the stack front's command line
    on another port; no engine): its base URL once it answers."""
    cmd = psutil.Process(stack.pids()["openai-api"]).cmdline()
    port = free_ports(1)
    cmd[cmd.index("--port") + 1] = str(port)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the second front did not come up"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_killed_worker_answers_503_then_is_restarted(stack, client):
    """kill -9 of a worker: within 2 s its model answers 503 + Retry-After
    (never 404: it was served a moment ago, also by a front that never listed
    the models) while the other model keeps serving; the stack logs the
    cause, restarts it with the same command line, and the model answers again."""
    old = stack.pids()["worker random#0"]
    cmdline = psutil.Process(old).cmdline()
    assert cmdline[cmdline.index("--max-queued-requests") + 1] == "4"  # the stack's flag reached the worker
    with second_front(stack) as fresh:
        body = {"model": "random", "messages": messages(), "max_tokens": 5}
        fresh_chat = lambda: httpx.post(fresh + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # noqa: E731
        assert fresh_chat().status_code == 200  # served through it; /v1/models never asked
        mark = len(stack.lines)
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        first_503 = None
        while True:
            try:
                r = client.chat.completions.create(model="random", messages=messages(), max_tokens=5)
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and "'random'" in exc.message, (exc.status_code, exc.message)
                assert exc.response.headers["retry-after"] == "5"
                if first_503 is None:
                    first_503 = time.monotonic() - killed
                    r = client.chat.completions.create(model="scripted-chat", messages=messages(), temperature=0)
                    assert r.choices[0].message.content == CHAT_REPLY
                    other = fresh_chat()
                    assert other.status_code == 503 and other.headers["retry-after"] == "5", other.text
            assert time.monotonic() - killed < 300, "the killed worker did not come back"
            time.sleep(0.5)
    assert first_503 is not None and first_503 < 2, first_503
    assert r.choices[0].finish_reason in ("stop", "length")
    stack.wait_line(rf"worker random#0 \(pid {old}\) exited \(killed by SIGKILL\); restarting it in \d+ s", 1, mark)
    stack.wait_line(r"worker random#0 is back \(restart 1, up after \d+ s\)", 10, mark)
    worker = next(w for w in stack.info()["workers"] if w["name"] == "worker random#0")
    assert worker["restarts"] == 1 and worker["pid"] != old
    assert psutil.Process(worker["pid"]).cmdline() == cmdline
    deadline = time.monotonic() + HEARTBEAT_S + 10  # it registers again once ready; the front caches 2 s
    while sorted(m.id for m in client.models.list().data) != ["random", "scripted-chat"]:
        assert time.monotonic() < deadline, "the restarted worker is not listed again"
        time.sleep(0.5)


def test_crash_looping_worker_is_left_down_with_the_reason(stack, client):
    """A worker that keeps dying before it is up (here: killed while it
    loads) is restarted after a growing backoff, then left down with the
    reason and its log's tail; its model answers 503, the other serves on."""
    mark = len(stack.lines)
    gave_up = r"worker random#0 exited \(killed by SIGKILL\): 3 start-ups in a row ended before it was ready; not restarting it"
    for _ in range(5):
        pid = stack.pids()["worker random#0"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while stack.pids()["worker random#0"] == pid and not any(re.search(gave_up, line) for line in stack.lines[mark:]):
            assert time.monotonic() < deadline, "no restart and no give-up"
            time.sleep(0.05)
        if any(re.search(gave_up, line) for line in stack.lines[mark:]):
            break
    delays = [int(d) for line in stack.lines[mark:] for d in re.findall(r"worker random#0 .*restarting it in (\d+) s", line)]
    assert delays[-2:] == [1, 2], delays  # the backoff doubles
    end = next(i for i, line in enumerate(stack.lines) if re.search(gave_up, line))
    assert stack.lines[end + 1].startswith("    "), stack.lines[end:]  # the log's tail follows
    worker = next(w for w in stack.info()["workers"] if w["name"] == "worker random#0")
    assert worker["given_up"] is True
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="random", messages=messages(), max_tokens=5)
    assert info.value.status_code == 503
    r = client.chat.completions.create(model="scripted-chat", messages=messages(), temperature=0)
    assert r.choices[0].message.content == CHAT_REPLY


def test_stack_stops_cleanly(stack):
    tracked = set(stack.pids().values()) | stack.descendants
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(timeout=90) == 0
    stack.wait_line(r"^\[stack\] stopped", timeout=1)
    assert not stack.ready_file.exists()
    deadline = time.monotonic() + 10
    while alive := [p for p in tracked if running(p)]:
        assert time.monotonic() < deadline, f"processes left behind: {alive}"
        time.sleep(0.2)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
