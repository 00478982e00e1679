"""A worker on another machine: controller + front on one host, the worker on
a second. The hosts are network namespaces on this machine joined by a bridge
(``ip netns`` + veth; nothing routes to the outside), so the worker must
advertise its own host address for the controller and the front to reach it.
(The controller spreading requests over replicas is FastChat's, checked on
one host by the reliability topology: test_faults.py.) Needs root; skipped
where network namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.231.77"
HOSTS = {"ctl": 1, "w1": 2}
CONTROLLER = f"http://{SUBNET}.1:21001"
FRONT = f"http://{SUBNET}.1:8000"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NamespaceNetwork:
    """Namespaces ``<tag>-ctl`` and ``<tag>-w1`` on one bridge in ``<tag>-sw``."""

    def __init__(self) -> None:
        self.tag = f"qvt{os.getpid() % 10000}"
        self.switch = f"{self.tag}-sw"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def up(self) -> None:
        for name in (self.switch, *(self.ns(h) for h in HOSTS)):
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host, last in HOSTS.items():
            inner, outer = f"{self.tag}{host}a", f"{self.tag}{host}b"
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", inner, "netns", self.ns(host))
            ip("link", "set", outer, "netns", self.switch)
            ip("-n", self.switch, "link", "set", outer, "master", "br0")
            ip("-n", self.switch, "link", "set", outer, "up")
            ip("-n", self.ns(host), "addr", "add", f"{SUBNET}.{last}/24", "dev", inner)
            ip("-n", self.ns(host), "link", "set", inner, "up")

    def run(self, host: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *cmd],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            cwd=log.parent,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def curl(self, host: str, url: str, data: str | None = None) -> str | None:
        cmd = ["ip", "netns", "exec", self.ns(host), "curl", "-sf", "-m", "3", url]
        if data is not None:
            cmd += ["-X", "POST", "-H", "Content-Type: application/json", "-d", data]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # engine processes left in the group
            except ProcessLookupError:
                pass
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def network():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("curl") is None:
        pytest.skip("needs root, iproute2 and curl to make network namespaces")
    net = NamespaceNetwork()
    try:
        net.up()
    except subprocess.CalledProcessError as exc:
        net.down()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    yield net
    net.down()


def wait_for(what: str, probe, procs: list[subprocess.Popen], timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args} exited with {proc.returncode} while waiting for {what}"
        if (out := probe()) is not None:
            return out
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


CLIENT = """
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=120)
replies = [c.chat.completions.create(model="scripted-chat", temperature=0,
           messages=[{"role": "user", "content": f"Hello {i}"}]).choices[0].message.content for i in range(8)]
stream = c.chat.completions.create(model="scripted-chat", temperature=0, stream=True,
                                   messages=[{"role": "user", "content": "Hello"}])
streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
print(json.dumps({"replies": replies, "streamed": streamed, "models": [m.id for m in c.models.list().data]}))
"""


def test_worker_on_another_host(network, scripted_model, tmp_path):
    py = sys.executable
    worker_url = f"http://{SUBNET}.{HOSTS['w1']}:21002"
    controller = network.run(
        "ctl", [py, "-m", "fastchat.serve.controller", "--host", f"{SUBNET}.1", "--port", "21001"], tmp_path / "ctl.out"
    )
    cmd = [py, "-m", "qwen_vllm.worker_launch", "--model-path", str(scripted_model), "--host", f"{SUBNET}.{HOSTS['w1']}",
           "--port", "21002", "--controller-address", CONTROLLER, "--enforce-eager", "--max-model-len", "1024"]  # fmt: skip
    worker = network.run("w1", cmd, tmp_path / "w1.log", {"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "2"})
    front = network.run(
        "ctl", [py, "-m", "qwen_vllm.serving.front", "--host", f"{SUBNET}.1", "--port", "8000",
                "--controller-address", CONTROLLER], tmp_path / "front.log",
    )  # fmt: skip
    procs = [controller, worker, front]
    wait_for("the worker", lambda: network.curl("ctl", worker_url + "/health"), procs)  # reached from the controller's host

    def registered() -> str | None:
        out = network.curl("ctl", CONTROLLER + "/worker_get_status", data="{}")
        return out if out and json.loads(out)["speed"] == 1 else None

    status = json.loads(wait_for("the worker to register", registered, procs, timeout=60))
    assert status["model_names"] == ["scripted-chat"]
    address = network.curl("ctl", CONTROLLER + "/get_worker_address", data='{"model": "scripted-chat"}')
    assert json.loads(address)["address"] == worker_url  # it advertised its own host's address
    log = (tmp_path / "w1.log").read_text()
    assert f"registered {worker_url} with the FastChat controller {CONTROLLER}" in log

    wait_for("the front", lambda: network.curl("ctl", FRONT + "/health"), procs, timeout=60)
    out = subprocess.run(
        ["ip", "netns", "exec", network.ns("ctl"), py, "-c", CLIENT, FRONT], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replies"] == [CHAT_REPLY] * 8 and result["streamed"] == CHAT_REPLY
    assert result["models"] == ["scripted-chat"]
    metrics = network.curl("ctl", worker_url + "/metrics")
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:request_success_total{") and 'finished_reason="stop"' in line
    )
    assert served == 9, served  # every request reached the worker on the other host
