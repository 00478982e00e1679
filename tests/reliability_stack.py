"""One FastChat topology shared by test_bad_input.py and test_faults.py.

Real processes on 127.0.0.1, each in its own session (so a test can signal
one and look for orphans): the FastChat controller, two ``qwen-vllm worker``
processes on the scripted chat fixture (served as "scripted", with two LoRA
adapters; worker A admits at most A_LIMIT requests and may load adapters at
run time, worker B is started with ``--api-key``), and the OpenAI front (``--worker-api-key`` so it
can reach B). Started once per session and stopped after the last module
that uses it, so its two engines are not alive during other modules.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from fastchat_helpers import start_controller

from qwen_vllm.runtime.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
MODEL = "scripted"
WORKER_KEY = "sk-worker-b"
HEARTBEAT_S = 2  # FastChat parses it with int()
MAX_MODEL_LEN = 1024
A_LIMIT = 16  # generation requests worker A admits at once (test_faults.py fills it)
ADAPTERS = ("lora-a", "lora-b")  # LoRA adapters both workers serve (test_adapters_served.py)
RUNTIME_ADAPTER = "lora-c"  # loaded into worker A at run time
WORKER_FLAGS = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--max-num-seqs", "128"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(HEARTBEAT_S)}


@dataclass
class Topology:
    model_dir: Path
    log_dir: Path
    base: int = field(default_factory=lambda: free_ports(4))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.base + 1}"

    def worker_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.base + 2 + 'ab'.index(name)}"

    def start_controller(self) -> None:
        self.procs["controller"] = start_controller(self.base, self.log_dir)

    def _spawn(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**env(), **(extra_env or {})}, start_new_session=True
            )

    def adapter_dir(self, name: str) -> Path:
        return self.log_dir / "adapters" / name

    def make_adapters(self) -> None:
        from qwen_vllm.checkpoints.lora import make_adapter

        for seed, name in enumerate((*ADAPTERS, RUNTIME_ADAPTER), start=1):
            # strength 2: the scripted model's margins are wide; each adapter must change its words
            make_adapter(self.model_dir, self.adapter_dir(name), rank=8, seed=seed, strength=2.0)

    def start_worker(self, name: str) -> None:
        from qwen_vllm.serving.stack import device_env

        port = self.base + 2 + "ab".index(name)
        cmd = [sys.executable, "-m", "qwen_vllm.worker_launch", "--model-path", str(self.model_dir),
               "--model-names", MODEL, "--port", str(port), "--controller-address", self.controller_url,
               *WORKER_FLAGS, "--lora-modules", *(f"{a}={self.adapter_dir(a)}" for a in ADAPTERS)]  # fmt: skip
        extra_env = device_env("ab".index(name), 2, 1)
        if name == "a":
            cmd += ["--limit-worker-concurrency", str(A_LIMIT)]  # FastChat's flag: A's admission limit
            extra_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # vLLM's /v1/load_lora_adapter
        if name == "b":
            cmd += ["--api-key", WORKER_KEY]
        self._spawn(f"worker-{name}", cmd, extra_env)

    def start_front(self) -> None:
        cmd = [sys.executable, "-m", "qwen_vllm.serving.front", "--port", str(self.base + 1),
               "--controller-address", self.controller_url, "--worker-api-key", WORKER_KEY]  # fmt: skip
        self._spawn("front", cmd)

    def wait_ready(self, timeout: float = 900) -> None:
        """Until both workers answer /health and the controller lists the model."""
        deadline = time.monotonic() + timeout
        pending = {"a": {}, "b": {"Authorization": f"Bearer {WORKER_KEY}"}}
        while pending or MODEL not in self.controller_models():
            for name, headers in list(pending.items()):
                proc = self.procs[f"worker-{name}"]
                if proc.poll() is not None:
                    log = (self.log_dir / f"worker-{name}.log").read_text(errors="replace")
                    pytest.fail(f"worker {name} exited ({proc.returncode}):\n{log[-4000:]}")
                try:
                    if httpx.get(self.worker_url(name) + "/health", headers=headers, timeout=2).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            assert time.monotonic() < deadline, f"workers not ready after {timeout} s (logs in {self.log_dir})"
            time.sleep(0.5)

    def controller_models(self) -> list[str]:
        try:
            return httpx.post(self.controller_url + "/list_models", timeout=2).json()["models"]
        except httpx.HTTPError:
            return []

    def tree(self, name: str) -> list[psutil.Process]:
        """The process and its descendants (engine processes)."""
        root = psutil.Process(self.procs[name].pid)
        return [root, *root.children(recursive=True)]

    def _signal(self, name: str, sig: int) -> None:
        """``sig`` to the process group of a worker or the front (each leads its
        own session), to the controller itself (it shares pytest's group)."""
        proc = self.procs[name]
        try:
            if name == "controller":
                if proc.poll() is None:
                    proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        for name in self.procs:
            self._signal(name, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            self._signal(name, signal.SIGKILL)  # stragglers in its group (engine processes)


_shared: dict[str, object] = {}


@pytest.fixture(scope="module")
def topology(request, scripted_model, artifacts_dir):
    """The shared topology; stopped when the last module using it is done (a
    module that asks for it only through getfixturevalue sets USES_TOPOLOGY)."""
    if "topology" not in _shared:
        users = {
            item.module.__name__
            for item in request.session.items
            if "topology" in item.fixturenames or getattr(item.module, "USES_TOPOLOGY", False)
        }
        log_dir = artifacts_dir / "reliability"
        log_dir.mkdir(exist_ok=True)
        t = Topology(Path(scripted_model), log_dir)
        request.config.add_cleanup(t.stop)  # safety net if a module is interrupted
        t.make_adapters()
        t.start_controller()
        t.start_worker("a")
        t.start_worker("b")
        t.start_front()
        t.wait_ready()
        _shared.update(topology=t, users=users)
    yield _shared["topology"]
    users = _shared["users"]
    users.discard(request.module.__name__)
    if not users:
        _shared["topology"].stop()
