"""Load: many concurrent streaming clients through the OpenAI front.

Starts ``qwen-vllm stack`` (the real FastChat controller, ``--workers`` workers,
the front) on a fixture model, then runs ``--clients`` concurrent streaming
clients x ``--requests`` greedy chat requests each, twice: through the front
(ours) and straight to the workers' own /v1 (the anchor: no front, clients
spread round robin). Checks that no request fails or is lost and that every
reply equals the single-request reply; samples the RSS of each process (with
its engine processes) every 0.5 s; prints a side-by-side table and writes
JSON to results/.

    PYTHONPATH=. python scripts/bench_load.py [--clients 64] [--requests 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import psutil

from qwen_vllm.bench.engine import write_json
from qwen_vllm.runtime.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Hello"}]


class Stack:
    """``qwen-vllm stack`` as a subprocess; pids and URLs from its ready file."""

    def __init__(self, model: Path, workers: int, log_dir: Path) -> None:
        from qwen_vllm.serving.stack import launch_stack

        base = free_ports(2 + workers)
        argv = ["--model", str(model), "--workers", str(workers), "--port", str(base),
                "--controller-port", str(base + 1), "--worker-port", str(base + 2), "--log-dir", str(log_dir),
                "--", "--enforce-eager", "--max-model-len", "1024", "--dtype", "float32", "--max-num-seqs", "128"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        print("starting qwen-vllm stack ...", flush=True)
        self.proc, info = launch_stack(argv, log=log_dir / "stack.out", ready_file=log_dir / "ready.json", env=env)
        self.front_url = info["api_url"].removesuffix("/v1")
        self.worker_urls = [w["url"] for w in info["workers"]]
        self.pids = {r["name"]: r["pid"] for r in (info["controller"], info["front"], *info["workers"])}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class RssSampler:
    """Peak and last RSS (MiB) of each role's process tree, sampled every 0.5 s."""

    def __init__(self, roles: dict[str, int]) -> None:
        self.roles = {name: psutil.Process(pid) for name, pid in roles.items()}
        self.peak: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, float]:
        out = {}
        for name, proc in self.roles.items():
            try:
                tree = [proc, *proc.children(recursive=True)]
                out[name] = sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20
            except psutil.NoSuchProcess:
                pass
        return out

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            for name, mib in self.sample().items():
                self.peak[name] = max(self.peak.get(name, 0.0), mib)
                self.last[name] = mib

    def __enter__(self) -> RssSampler:
        self.first = self.sample()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


async def load(urls: list[str], clients: int, requests: int, expected: str, model: str) -> dict:
    """``clients`` concurrent clients, client i on urls[i % len(urls)], each
    streaming ``requests`` greedy replies one after another."""
    conns = [openai.AsyncOpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=600) for u in urls]
    latencies: list[float] = []
    ttfts: list[float] = []
    failures: list[str] = []
    mismatches = 0

    async def one(c: openai.AsyncOpenAI) -> None:
        nonlocal mismatches
        start = time.perf_counter()
        first = None
        text = ""
        try:
            stream = await c.chat.completions.create(model=model, messages=MESSAGES, temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text += chunk.choices[0].delta.content
        except openai.APIError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        latencies.append(time.perf_counter() - start)
        ttfts.append((first or time.perf_counter()) - start)
        mismatches += text != expected

    async def client(i: int) -> None:
        for _ in range(requests):
            await one(conns[i % len(conns)])

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    for c in conns:
        await c.close()
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "requests": clients * requests,
        "completed": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "mismatched": mismatches,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": q[18],
        "ttft_p50_s": statistics.median(ttfts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", type=Path, help="checkpoint (default: a fresh scripted fixture)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "load.json")
    args = parser.parse_args()

    from qwen_vllm.checkpoints.fixtures import CHAT_REPLY, make_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    model = args.model or make_model(tmp / "scripted", "scripted")
    expected = CHAT_REPLY if args.model is None else None
    stack = Stack(model, args.workers, tmp / "logs")
    try:
        name = Path(model).name
        single = openai.OpenAI(base_url=stack.front_url + "/v1", api_key="none", max_retries=0, timeout=600)
        reply = single.chat.completions.create(model=name, messages=MESSAGES, temperature=0).choices[0].message.content
        if expected is not None and reply != expected:
            raise SystemExit(f"single reply {reply!r} is not the scripted reply")
        results = {}
        with RssSampler(stack.pids) as rss:
            for label, urls in (("front", [stack.front_url]), ("direct", stack.worker_urls)):
                results[label] = asyncio.run(load(urls, args.clients, args.requests, reply, name))
        report = {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "workers": args.workers,
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_at_end": os.getloadavg(),
            "through_front": results["front"],
            "direct_to_workers": results["direct"],
            "rss_mib": {k: {"start": rss.first.get(k), "peak": rss.peak.get(k), "end": rss.last.get(k)} for k in rss.roles},
        }
    finally:
        stack.stop()
    write_json(args.out, report)
    front, direct = results["front"], results["direct"]
    print(f"\n{args.clients} clients x {args.requests} streamed greedy requests, {args.workers} workers")
    print(f"{'':24}{'front (ours)':>14}{'direct (anchor)':>17}{'ratio':>8}")
    for key in ("completed", "failed", "mismatched", "requests_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s"):
        a, b = front[key], direct[key]
        ratio = f"{a / b:.2f}" if isinstance(a, float) and b else ""
        print(f"{key:24}{a:>14.3f}{b:>17.3f}{ratio:>8}" if isinstance(a, float) else f"{key:24}{a:>14}{b:>17}")
    print(f"\n{'RSS MiB (with children)':24}{'start':>10}{'peak':>10}{'end':>10}")
    for role, v in report["rss_mib"].items():
        print(f"{role:24}{v['start'] or 0:>10.0f}{v['peak'] or 0:>10.0f}{v['end'] or 0:>10.0f}")
    print(f"\nwrote {args.out}")
    ok = all(r["failed"] == 0 and r["mismatched"] == 0 and r["completed"] == r["requests"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
