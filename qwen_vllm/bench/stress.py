"""The stack under stress: ``qwen-vllm bench admission`` and ``bench chaos``.

``admission``: how long a request waits by its place in the queue, which is
what ``--max-queued-requests`` bounds. One worker (``--max-num-seqs B``, no
admission limit) gets a burst of N requests sent a few ms apart, all of the
same length; request i's latency is measured by its arrival order. The first
B run at once; each further wave of B waits for one before it. From the same
data: for each queue bound Q, the p99 latency of the requests it would admit
(the first B + Q) and the share it would refuse with a 429 at once.

``chaos``: one ``qwen-vllm stack --workers 2`` serves two phases of the same
traffic: ``calm`` (nothing killed) and ``chaos`` (a worker ``kill -9``ed every
``--kill-every`` seconds, alternating, once both are up). C clients each
stream greedy chat completions back to back through the official openai SDK
with its default retries (429 and 503 with Retry-After, connection errors). A
stream cut mid-reply ends with the front's error event; the client sends that
request again, as a user's retry would. Every completed reply must equal the
single-request reply taken first (greedy). Per phase: requests sent,
completed, retried by the client, retried by the SDK, failed after retries,
wrong replies, latency p50/p99 (first send to last token, retries included)
and the stack's RSS over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from qwen_vllm.runtime.processes import tree_resident_bytes

MODEL = "bench"  # the name the stack serves the model as
SEND_GAP_S = 0.02  # between a burst's requests: their arrival order is their index
CLIENT_RESENDS = 5  # a request cut this many times in a row counts as failed
RSS_EVERY_S = 5.0


def say(message: str) -> None:
    print(f"[stress] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


def stack_rss_mib(pid: int) -> float:
    """Resident memory of the stack and every process under it, MiB."""
    return tree_resident_bytes(pid) / 2**20


class Phase:
    """One phase's traffic: C clients, each sending until the phase ends."""

    def __init__(self, api_url: str, model: str, reference: str, new_tokens: int) -> None:
        self.api_url, self.model, self.reference, self.new_tokens = api_url, model, reference, new_tokens
        self.sent = self.completed = self.client_retries = self.failed = self.wrong = 0
        self.http_requests = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    async def one(self, client) -> None:
        """One request, sent again (up to CLIENT_RESENDS times) when its stream is cut."""
        import openai

        self.sent += 1
        start = time.monotonic()
        for attempt in range(CLIENT_RESENDS + 1):
            try:
                stream = await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": "Hello"}],
                    temperature=0,
                    max_tokens=self.new_tokens,
                    stream=True,
                )
                text = ""
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            except openai.APIError as exc:
                kind = f"{type(exc).__name__} {getattr(exc, 'status_code', '') or ''}".strip()
                self.errors[kind] = self.errors.get(kind, 0) + 1
                if attempt < CLIENT_RESENDS:
                    self.client_retries += 1
                continue
            self.completed += 1
            self.wrong += text != self.reference
            self.latencies.append(time.monotonic() - start)
            return
        self.failed += 1

    async def run(self, clients: int, until: float, max_requests: int) -> None:
        import openai

        async def count(_request: httpx.Request) -> None:  # every HTTP attempt, the SDK's retries included
            self.http_requests += 1

        http = httpx.AsyncClient(timeout=300, event_hooks={"request": [count]}, trust_env=False)
        async with openai.AsyncOpenAI(base_url=self.api_url, api_key="none", http_client=http) as client:

            async def loop() -> None:
                while time.monotonic() < until and (not max_requests or self.sent < max_requests):
                    await self.one(client)

            await asyncio.gather(*(loop() for _ in range(clients)))

    def summary(self, name: str, seconds: float, kills: int, rss: list[float]) -> dict:
        return {
            "phase": name,
            "seconds": round(seconds, 1),
            "kills": kills,
            "sent": self.sent,
            "completed": self.completed,
            "client_retries": self.client_retries,
            "sdk_retries": self.http_requests - self.sent - self.client_retries,
            "failed": self.failed,
            "wrong_replies": self.wrong,
            "p50_s": round(statistics.median(self.latencies), 3) if self.latencies else 0.0,
            "p99_s": round(percentile(self.latencies, 99), 3),
            "errors_seen": self.errors,
            "rss_mib_start": round(rss[0], 1) if rss else 0.0,
            "rss_mib_end": round(rss[-1], 1) if rss else 0.0,
            "rss_mib_max": round(max(rss), 1) if rss else 0.0,
        }


def kill_workers(ready_file: Path, every: float, stop: threading.Event, kills: list[str]) -> None:
    """Every ``every`` seconds SIGKILL the next worker (round robin) named in
    the ready file -- once every worker is up again: never the last live one."""
    index = 0
    while not stop.wait(every):
        while not all(w["ready"] for w in json.loads(ready_file.read_text())["workers"]):
            if stop.wait(1.0):
                return
        worker = json.loads(ready_file.read_text())["workers"][index % 2]
        index += 1
        try:
            os.kill(worker["pid"], signal.SIGKILL)
            kills.append(worker["name"])
            say(f"kill -9 {worker['name']} (pid {worker['pid']})")
        except ProcessLookupError:
            pass


def start_stack(args: argparse.Namespace, model: Path, tmp: Path, extra: list[str], worker: list[str] = ()):
    """``qwen-vllm stack EXTRA -- WORKER`` serving ``model`` as "bench" on
    free ports, its files in ``tmp``; (process, ready-file state)."""
    from qwen_vllm.bench.serving import native_args
    from qwen_vllm.runtime.ports import free_ports
    from qwen_vllm.serving.stack import launch_stack

    base = free_ports(4)
    argv = ["--model", str(model), "--model-names", MODEL, "--port", str(base), "--controller-port", str(base + 1),
            "--worker-port", str(base + 2), "--log-dir", str(tmp / "logs"), *extra,
            "--", *native_args(args.dtype, args.load_format, 2048, args.compiled), *worker]  # fmt: skip
    say(f"starting qwen-vllm stack {' '.join(extra)} (logs in {tmp}/logs)")
    env = {**os.environ, "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "5"}
    return launch_stack(argv, log=tmp / "stack.log", ready_file=tmp / "ready.json", env=env)


def stop_stack(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except Exception:
        proc.kill()


def admission(args: argparse.Namespace, model: Path) -> dict:
    """Latency by queue position on one worker; the report's data."""
    b, n = args.max_num_seqs, args.waves * args.max_num_seqs
    with tempfile.TemporaryDirectory(prefix="qwen-admission-") as tmp:
        worker = ["--max-num-seqs", str(b), "--limit-worker-concurrency", str(10 * n)]  # no request refused
        proc, state = start_stack(args, model, Path(tmp), ["--workers", "1"], worker)
        try:
            url = state["workers"][0]["url"] + "/v1/completions"
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": args.new_tokens, "ignore_eos": True, "temperature": 0}

            async def burst() -> list[float]:
                async with httpx.AsyncClient(timeout=3600, trust_env=False) as client:

                    async def one(i: int) -> float:
                        await asyncio.sleep(i * SEND_GAP_S)  # arrival order = index
                        start = time.monotonic()
                        (await client.post(url, json=body)).raise_for_status()
                        return time.monotonic() - start

                    return list(await asyncio.gather(*(one(i) for i in range(n))))

            asyncio.run(burst())  # warm-up: the first requests of an engine are slower
            latencies = asyncio.run(burst())
        finally:
            stop_stack(proc)
    waves = [statistics.median(latencies[w * b : (w + 1) * b]) for w in range(args.waves)]
    bounds = sorted({0, b // 2, b, 2 * b, 3 * b} & set(range(n - b + 1)))
    return {
        "max_num_seqs": b,
        "requests": n,
        "latencies_s": [round(x, 3) for x in latencies],
        "waves": [{"wave": w, "positions": f"{w * b}..{(w + 1) * b - 1}", "median_s": round(m, 3),
                   "vs_first_wave": round(m / waves[0], 2)} for w, m in enumerate(waves)],  # fmt: skip
        "bounds": [
            {"max_queued_requests": q, "admitted_p99_s": round(percentile(latencies[: b + q], 99), 3),
             "refused_share": round(1 - (b + q) / n, 2)}
            for q in bounds
        ],  # fmt: skip
    }


def chaos(args: argparse.Namespace, model: Path) -> dict:
    """The calm and chaos phases on one stack; the report's data."""
    import openai

    with tempfile.TemporaryDirectory(prefix="qwen-chaos-") as tmp:
        ready_file = Path(tmp) / "ready.json"
        proc, state = start_stack(args, model, Path(tmp), ["--workers", "2"])
        try:
            api = state["api_url"]
            reference = openai.OpenAI(base_url=api, api_key="none").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=args.new_tokens
            ).choices[0].message.content
            phases = []
            for name, seconds in (("calm", args.calm_duration), ("chaos", args.duration)):
                phase = Phase(api, MODEL, reference, args.new_tokens)
                stop, kills, rss = threading.Event(), [], []
                killer = threading.Thread(target=kill_workers, args=(ready_file, args.kill_every, stop, kills), daemon=True)
                if name == "chaos":
                    killer.start()
                say(f"{name}: {args.clients} streaming clients for {seconds:.0f} s")
                started = time.monotonic()
                sampler = threading.Thread(target=sample_rss, args=(proc.pid, stop, rss), daemon=True)
                sampler.start()
                asyncio.run(phase.run(args.clients, started + seconds, args.max_requests))
                stop.set()
                phases.append(phase.summary(name, time.monotonic() - started, len(kills), rss))
                say(json.dumps(phases[-1]))
            log = (Path(tmp) / "stack.log").read_text(errors="replace")
            restarts = log.count("restarting it in")
        finally:
            stop_stack(proc)
    calm, hit = phases
    return {
        "clients": args.clients,
        "kill_every_s": args.kill_every,
        "stack_restarts": restarts,
        "phases": phases,
        "ratios": {
            "p50 chaos/calm": hit["p50_s"] / calm["p50_s"] if calm["p50_s"] else 0.0,
            "p99 chaos/calm": hit["p99_s"] / calm["p99_s"] if calm["p99_s"] else 0.0,
        },
        "goals": {
            "no request failed after retries": calm["failed"] + hit["failed"] == 0,
            "every reply greedy-identical": calm["wrong_replies"] + hit["wrong_replies"] == 0,
        },
    }


def sample_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    out.append(stack_rss_mib(pid))
    while not stop.wait(RSS_EVERY_S):
        out.append(stack_rss_mib(pid))
    out.append(stack_rss_mib(pid))
