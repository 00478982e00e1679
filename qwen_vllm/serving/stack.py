"""``qwen-vllm stack``: the FastChat topology in one command.

Starts the real FastChat controller (``python -m fastchat.serve.controller``),
K workers per model (worker_launch.py), the OpenAI front (openai_front.py)
and, with ``--web``, the web UI (``python -m qwen_vllm.ui.web``); shows
progress while engines load, waits until every worker is healthy and
registered, prints the URLs, and on Ctrl-C/SIGTERM stops everything.

Every child runs in its own process group (its engine processes included)
and gets SIGTERM if the stack itself dies (PR_SET_PDEATHSIG), so nothing is
left behind. Any child that exits is restarted with the same command (the
controller holds no state: workers re-register within one heartbeat; a
worker's model is served by its other workers meanwhile, and the front
answers 503 + Retry-After while none is live): at once after a run that came
up and stayed up STABLE_S, after BACKOFF_S if it died sooner after coming up;
one that dies before it is up is restarted after a backoff doubling from
BACKOFF_S, and after MAX_START_FAILURES such start-ups in a row it is left
down, with the reason and its log's tail (a worker that came up and served is
always restarted: an OOM kill under load is not a broken configuration). Each
exit is reported with its cause (signal, exit code, the OOM killer). Arguments after ``--`` go to every worker (vLLM engine flags:
``--dtype float16 --quantization gptq --kv-cache-dtype auto`` ...); each
worker's command line is parsed and checked before anything starts.
On a CPU machine the cores are split between workers (VLLM_CPU_OMP_THREADS_BIND);
on GPUs, CUDA_VISIBLE_DEVICES is split likewise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from qwen_vllm.errors import QwenVLLMError
from qwen_vllm.runtime.processes import die_with_parent, exit_cause, oom_kills
from qwen_vllm.serving.http import http_url

PROGRESS_EVERY_S = 10.0
STOP_GRACE_S = 30.0
# A worker still loading its engine is killed after this (nothing to finish;
# vLLM's server only handles SIGTERM once the engine is up).
LOADING_STOP_GRACE_S = 3.0
# Supervision: a child that dies before it is ready failed to start; restarts
# after failed start-ups wait BACKOFF_S, doubling up to MAX_BACKOFF_S, and
# MAX_START_FAILURES in a row end the retries. One that dies within STABLE_S of
# becoming ready restarts after BACKOFF_S, later than that at once.
STABLE_S = 30.0
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MAX_START_FAILURES = 3


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


@dataclass
class Child:
    """One supervised process: a role name, its command and where it logs."""

    name: str
    cmd: list[str]
    log: Path
    url: str
    probe: str  # "METHOD URL" that answers 200 once the child is ready
    probe_headers: dict[str, str] = field(default_factory=dict)  # its API key, if it needs one
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready_at: float | None = None  # when it last became ready (None: not since its start)
    restarts: int = 0
    start_failures: int = 0  # start-ups in a row that ended before it was ready
    restart_at: float | None = None  # set while a restart is pending
    given_up: bool = False
    oom_kills_at_start: int | None = None

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    def start(self) -> None:
        self.ready_at = None
        self.oom_kills_at_start = oom_kills()
        with open(self.log, "ab") as out:
            if self.restarts:
                out.write(f"----- [stack] restart {self.restarts} -----\n".encode())
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,  # SIGTERM this child when the stack dies
            )
        self.started = time.monotonic()
        say(f"{self.name:<22} pid {self.proc.pid:<7} {self.url}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def device_env(index: int, count: int, tp: int) -> dict[str, str]:
    """Environment giving worker ``index`` of ``count`` its own cores (CPU) or GPUs."""
    from qwen_vllm.runtime.cpu import on_cpu, thread_binding

    if on_cpu():
        if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return {}
        cores = sorted(os.sched_getaffinity(0))
        if count * tp > len(cores):
            if index == 0:
                say(f"warning: {count} workers x TP {tp} > {len(cores)} cores; workers share all cores")
            return {"VLLM_CPU_OMP_THREADS_BIND": thread_binding(tp, cores)}
        share = len(cores) // count
        return {"VLLM_CPU_OMP_THREADS_BIND": thread_binding(tp, cores[index * share : (index + 1) * share])}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [d for d in visible.split(",") if d]
    if count * tp > len(devices):
        raise SystemExit(f"qwen-vllm stack: {count} workers x TP {tp} need {count * tp} GPUs; {len(devices)} visible")
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[index * tp : (index + 1) * tp])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, help="checkpoint directory (repeat to serve several)")
    parser.add_argument("--workers", type=int, default=1, help="worker replicas per model (default 1)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="tensor-parallel size of each worker")
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="context length of every worker (default: the model's seq_length; up to 32768 opts into "
        "Qwen's dynamic NTK + LogN long context)",
    )
    parser.add_argument(
        "--model-names",
        help="comma-separated names every worker serves instead of the directory's name, e.g. Qwen "
        "(clients written for Qwen's openai_api.py send model='Qwen')",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        help="per worker: generation requests that may wait beyond the --max-num-seqs running (429 + "
        "Retry-After past them; the front first tries another worker). Default: the worker's",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        help="LoRA adapters every worker serves (vLLM's flag): each is a model of its own to the "
        "controller and the API (clients pick it by 'model'); checked against the checkpoint first",
    )
    parser.add_argument("--web", action="store_true", help="also start the web UI (qwen_vllm.ui.web)")
    parser.add_argument("--host", default="127.0.0.1", help="address every part binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI API port")
    parser.add_argument("--controller-port", type=int, default=21001)
    parser.add_argument("--worker-port", type=int, default=21002, help="first worker port (next ones count up)")
    parser.add_argument("--web-port", type=int, default=7860)
    parser.add_argument("--api-keys", help="comma-separated keys the OpenAI API (and web UI) require")
    parser.add_argument("--log-dir", type=Path, help="where each process logs (default: a new temp directory)")
    parser.add_argument("--startup-timeout", type=float, default=1800, help="seconds to wait for every worker")
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write JSON (URLs, models, pids) here once everything answers, again after each restart; "
        "removed at stop. For scripts and tests: read it instead of parsing this output",
    )
    parser.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then vLLM engine flags for every worker")


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        host = args.host
        # Parts find each other on the loopback address when binding everywhere.
        self.controller_url = http_url(host, args.controller_port)
        self.api_url = http_url(host, args.port) + "/v1"
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="qwen-vllm-stack-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir.resolve()
        py = sys.executable
        self.controller = Child(
            "controller",
            [py, "-m", "fastchat.serve.controller", "--host", host, "--port", str(args.controller_port)],
            self.log_dir / "controller.out",
            self.controller_url,
            f"POST {self.controller_url}/list_models",
            cwd=self.log_dir,  # FastChat writes controller.log into its working directory
        )
        worker_args = [a for a in args.worker_args if a != "--"]
        if args.max_model_len is not None:
            worker_args = ["--max-model-len", str(args.max_model_len), *worker_args]
        if args.lora_modules:
            worker_args = ["--lora-modules", *args.lora_modules, *worker_args]
        if args.max_queued_requests is not None:
            worker_args = ["--max-queued-requests", str(args.max_queued_requests), *worker_args]
        self.keys = keys = [k for k in (args.api_keys or "").split(",") if k]
        if keys and host not in ("127.0.0.1", "::1", "localhost"):
            # Workers reachable from other machines: guard their routes too.
            worker_args += ["--api-key", keys[0]]
        key = worker_args[worker_args.index("--api-key") + 1] if "--api-key" in worker_args else None
        self.worker_headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.front_headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        count = len(args.model) * args.workers
        self.workers: list[Child] = []
        for m, model in enumerate(args.model):
            name = Path(os.path.abspath(model)).name
            for k in range(args.workers):
                index = m * args.workers + k
                port = args.worker_port + index
                cmd = [
                    py, "-m", "qwen_vllm.worker_launch", "--model-path", model, "--host", host, "--port", str(port),
                    "--controller-address", self.controller_url, "--worker-address", http_url(host, port),
                    "--tensor-parallel-size", str(args.tensor_parallel_size), *worker_args,
                ]  # fmt: skip
                if args.model_names:
                    cmd += ["--model-names", args.model_names]
                self.workers.append(
                    Child(
                        f"worker {name}#{k}",
                        cmd,
                        self.log_dir / f"worker-{name}-{k}.log",
                        http_url(host, port),
                        f"GET {http_url(host, port)}/ready",  # readiness: false while loading or dead
                        self.worker_headers,
                        env=device_env(index, count, args.tensor_parallel_size),
                    )
                )
        self.model_names: list[str] = []  # what the workers will register: check_worker_args
        front_cmd = [py, "-m", "qwen_vllm.serving.front", "--host", host, "--port", str(args.port),
                     "--controller-address", self.controller_url]  # fmt: skip
        if keys:
            front_cmd += ["--api-keys", args.api_keys]
        if key:
            front_cmd += ["--worker-api-key", key]
        front_health = f"GET {http_url(host, args.port)}/health"
        self.front = Child("openai-api", front_cmd, self.log_dir / "openai-api.log", self.api_url, front_health, self.front_headers)
        self.web: Child | None = None
        if args.web:
            web_cmd = [py, "-m", "qwen_vllm.ui.web", "--api-url", self.api_url, "--host", host,
                       "--port", str(args.web_port)]  # fmt: skip
            web_env = {"OPENAI_API_KEY": keys[0]} if keys else {}
            web_url = http_url(host, args.web_port)
            self.web = Child("web-ui", web_cmd, self.log_dir / "web-ui.log", web_url, f"GET {web_url}", env=web_env)
        self.client = httpx.Client(timeout=2.0, trust_env=False)

    def check_worker_args(self) -> None:
        """Parse and check each worker's command line as the worker will, before
        anything starts: a bad checkpoint, GPTQ Int8 or an FP8 KV cache on a CPU
        that cannot run them fails here with the reason, not in a worker log."""
        from qwen_vllm import worker_launch

        names: set[str] = set()
        for w in self.workers:
            args = worker_launch.resolve_args(worker_launch.build_parser().parse_args(w.cmd[3:]))
            names.update(args.served_model_name, (m.name for m in args.lora_modules or ()))
        self.model_names = sorted(names)

    @property
    def children(self) -> list[Child]:
        return [c for c in (self.controller, *self.workers, self.front, self.web) if c is not None]

    def _answers(self, method: str, url: str, **kwargs) -> bool:
        try:
            return self.client.request(method, url, **kwargs).status_code == 200
        except httpx.HTTPError:
            return False

    def _front_models(self) -> list[str]:
        try:
            return [m["id"] for m in self.client.get(f"{self.api_url}/models", headers=self.front_headers).json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def _registration_status(self) -> str:
        have = self._front_models()
        return f"workers to register {', '.join(self.model_names)} (the controller has {', '.join(have) or 'none'})"

    def _wait(self, what: str | Callable[[], str], ready, children: list[Child]) -> bool:
        """Poll ``ready()`` until true; False on stop, timeout or a child's death.
        ``what`` (or what it returns, when called) says what is awaited."""
        start = last = time.monotonic()
        while not self.stop.is_set():
            for child in children:
                if child.proc is not None and not child.alive():
                    say(f"{child.name} exited with code {child.proc.returncode} while starting; log {child.log}:")
                    print(child.tail(), flush=True)
                    return False
            if ready():
                return True
            now = time.monotonic()
            if now - start > self.args.startup_timeout:
                say(f"gave up waiting for {what if isinstance(what, str) else what()} after {now - start:.0f} s (logs in {self.log_dir})")
                return False
            if now - last >= PROGRESS_EVERY_S:
                last = now
                say(f"waiting for {what if isinstance(what, str) else what()} ({now - start:.0f} s)")
            self.stop.wait(0.5)
        return False

    def _check_ready(self, child: Child) -> bool:
        """Probe ``child`` (once ready, it stays so until it exits or restarts)."""
        if not child.ready:
            method, url = child.probe.split(" ", 1)
            if self._answers(method, url, headers=child.probe_headers):
                child.ready_at = time.monotonic()
        return child.ready

    def _workers_ready(self) -> bool:
        for w in self.workers:
            if not w.ready and self._check_ready(w):
                say(f"{w.name} engine ready after {time.monotonic() - w.started:.0f} s")
        return all(w.ready for w in self.workers)

    def start(self) -> bool:
        say(f"logs in {self.log_dir}")
        if self.web is not None and importlib.util.find_spec("qwen_vllm.ui.web") is None:
            say("--web needs the web UI module qwen_vllm.ui.web, which this installation lacks")
            return False
        self.controller.start()
        if not self._wait("the controller", lambda: self._check_ready(self.controller), [self.controller]):
            return False
        for w in self.workers:
            w.start()
        self.front.start()
        engines = f"{len(self.workers)} worker engine{'s' * (len(self.workers) > 1)} to load"
        if not self._wait(engines, self._workers_ready, [self.controller, *self.workers, self.front]):
            return False
        registered = lambda: self._check_ready(self.front) and set(self.model_names) <= set(self._front_models())  # noqa: E731
        if not self._wait(self._registration_status, registered, self.children):
            return False
        if self.web is not None:
            self.web.start()
            if not self._wait("the web UI", lambda: self._check_ready(self.web), [self.web]):
                return False
        self.write_ready_file()
        say("ready")
        print(f"  OpenAI API   {self.api_url}   models: {', '.join(self.model_names)}", flush=True)
        print(f"  controller   {self.controller_url}", flush=True)
        for w in self.workers:
            print(f"  {w.name:<12} {w.url}  (FastChat worker API and its own /v1)", flush=True)
        if self.web is not None:
            print(f"  web UI       {self.web.url}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        return True

    def state(self) -> dict:
        """What the ready file holds."""

        def role(child: Child) -> dict:
            return {
                "name": child.name,
                "url": child.url,
                "pid": child.proc.pid if child.proc else None,
                "log": str(child.log),
                "ready": child.ready,
                "restarts": child.restarts,
                "given_up": child.given_up,
            }

        return {
            "pid": os.getpid(),
            "api_url": self.api_url,
            "controller_url": self.controller_url,
            "models": self.model_names,
            "api_keys": self.keys,
            "log_dir": str(self.log_dir),
            "controller": role(self.controller),
            "workers": [role(w) for w in self.workers],
            "front": role(self.front),
            "web": role(self.web) if self.web is not None else None,
        }

    def write_ready_file(self) -> None:
        path = self.args.ready_file
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(path)  # readers never see half a file

    def supervise(self) -> None:
        """Until stopped: restart every child that exits (see the module doc)."""
        while not self.stop.wait(0.5):
            for child in self.children:
                self.tend(child)

    def tend(self, child: Child) -> None:
        """One supervision step for ``child``: note readiness, schedule or do a restart."""
        now = time.monotonic()
        if child.given_up:
            return
        if child.alive():
            if not child.ready and self._check_ready(child) and child.restarts:
                say(f"{child.name} is back (restart {child.restarts}, up after {now - child.started:.0f} s)")
                self.write_ready_file()
            return
        if child.restart_at is None:  # just found dead
            cause = exit_cause(child.proc.returncode, child.oom_kills_at_start)
            child.signal_group(signal.SIGKILL)  # engine processes left in its group
            child.start_failures = child.start_failures + 1 if child.ready_at is None else 0
            if child.start_failures >= MAX_START_FAILURES:
                child.given_up = True
                say(f"{child.name} exited ({cause}): {child.start_failures} start-ups in a row ended before it was "
                    f"ready; not restarting it. Its log {child.log} ends:")  # fmt: skip
                print(child.tail(), flush=True)
                self.write_ready_file()
                return
            if child.start_failures:
                delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (child.start_failures - 1))
            else:
                delay = 0.0 if now - child.ready_at >= STABLE_S else BACKOFF_S
            child.restart_at = now + delay
            say(f"{child.name} (pid {child.proc.pid}) exited ({cause}); restarting it in {delay:.0f} s; log {child.log}")
        if now >= child.restart_at:
            child.restart_at = None
            child.restarts += 1
            child.start()
            self.write_ready_file()

    def shutdown(self) -> None:
        """SIGTERM every process group (web, front, workers, controller), SIGKILL stragglers."""
        say("stopping")
        order = [c for c in (self.web, self.front, *self.workers, self.controller) if c is not None and c.proc]
        for child in order:
            child.signal_group(signal.SIGTERM)
        start = time.monotonic()
        for child in order:
            grace = LOADING_STOP_GRACE_S if child in self.workers and not child.ready else STOP_GRACE_S
            try:
                child.proc.wait(timeout=max(0.1, start + grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop in {grace:.0f} s; killing it")
            child.signal_group(signal.SIGKILL)  # engine processes left in its group, if any
        self.client.close()
        if self.args.ready_file is not None:
            self.args.ready_file.unlink(missing_ok=True)
        say("stopped")


def launch_stack(
    argv: list[str], *, log: Path, ready_file: Path, env: dict[str, str] | None = None, timeout: float = 1800
) -> tuple[subprocess.Popen, dict]:
    """Start ``qwen-vllm stack ARGV`` in a new session, its output in ``log``;
    wait for its ready file. Returns (process, ready-file contents). For
    scripts, benchmarks and tests."""
    ready_file.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_vllm.cli", "stack", "--ready-file", str(ready_file), *argv],  # before any "--"
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"qwen-vllm stack did not become ready (exit {proc.poll()}); {log}:\n{tail}")
        time.sleep(0.5)
    return proc, json.loads(ready_file.read_text())


def run(args: argparse.Namespace, on_ready: Callable[[Stack], bool] | None = None) -> int:
    """Start the stack and supervise it until Ctrl-C / SIGTERM. ``on_ready``
    runs once everything answers; returning False stops the stack (the demo's
    smoke check)."""
    if args.workers < 1 or args.tensor_parallel_size < 1:
        print("qwen-vllm stack: error: --workers and --tensor-parallel-size must be at least 1", file=sys.stderr)
        return 2
    if args.model_names and len(args.model) > 1:
        print("qwen-vllm stack: error: --model-names names one model; give a single --model", file=sys.stderr)
        return 2
    names = [Path(os.path.abspath(m)).name for m in args.model]
    if len(set(names)) != len(names):
        print(f"qwen-vllm stack: error: models must have distinct directory names, got {names}", file=sys.stderr)
        return 2
    stack = Stack(args)
    try:
        stack.check_worker_args()
    except QwenVLLMError as exc:
        stack.client.close()
        print(f"qwen-vllm stack: error: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, lambda *_: stack.stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if stack.start():
            if on_ready is None or on_ready(stack):
                stack.supervise()
            return 0
        return 0 if stack.stop.is_set() else 1
    finally:
        stack.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("stack")
