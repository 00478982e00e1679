"""Serving part of ``qwen-vllm bench versus``: the same traffic against

  ``native``  plain ``python -m vllm.entrypoints.openai.api_server`` (our model plugin only),
  ``worker``  the FastChat worker's own /v1 (vLLM's server + our endpoint plugin),
  ``front``   OpenAI front -> FastChat controller -> worker (``qwen-vllm stack``).

Load: vLLM's own benchmark client (``vllm.benchmarks.serve``, called directly:
the ``vllm bench`` CLI needs the "vllm" distribution name), random prompts,
fixed output length (ignore_eos), streaming /v1/completions, at each
concurrency. One engine at a time (a full-size model twice may not fit in
memory): the native server for half the rounds, then the stack, whose worker
serves both ``worker`` and ``front`` (interleaved round by round), then a new
native server for the other half, so the machine's drift and one engine's
luck weigh on both sides. Every engine gets the same CPU binding and KV-cache
size, so only the serving path differs. ``--target NAME=URL`` measures servers
that are already running instead (a deployment, another engine), each by the
first model its /v1/models lists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

TARGETS = {
    "native": "plain vLLM api_server",
    "worker": "worker's own /v1",
    "front": "front -> controller -> worker",
}
KEEP = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "completed", "duration")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    start = last = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                say(f"{what} ready after {time.monotonic() - start:.0f} s")
                return
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            say(f"waiting for {what} ({last - start:.0f} s)")
        time.sleep(1)
    raise RuntimeError(f"{what} not healthy after {timeout:.0f} s")


def run_client(base_url: str, model: Path, name: str, concurrency: int, num_prompts: int, spec: dict) -> dict:
    """One vllm.benchmarks.serve run; returns its result dict."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", str(model), "--served-model-name", name,
            "--dataset-name", "random", "--random-input-len", str(spec["input_len"]),
            "--random-output-len", str(spec["new_tokens"]), "--ignore-eos",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl",
        ]
    )  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # the client's own report is progress, not output
        return main(bench_args)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with ``start_new_session`` and everything in its
    group (vLLM's engine core and workers outlive a parent that is just killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    proc.wait()


@contextlib.contextmanager
def native_server(model: Path, name: str, port: int, engine_args: list[str], env: dict, log: Path) -> Iterator[dict]:
    say("starting the native vLLM server ...")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *engine_args],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 1800, f"native vLLM server (log {log})")
        yield {"native": f"http://127.0.0.1:{port}"}
    finally:
        stop_group(proc)


@contextlib.contextmanager
def stack(model: Path, base_port: int, engine_args: list[str], env: dict, log_dir: Path) -> Iterator[dict]:
    say("starting qwen-vllm stack (controller, worker, front) ...")
    from qwen_vllm.serving.stack import launch_stack

    front, ctl, worker = base_port, base_port + 1, base_port + 2
    argv = ["--model", str(model), "--port", str(front), "--controller-port", str(ctl), "--worker-port", str(worker),
            "--log-dir", str(log_dir), "--", *engine_args]  # fmt: skip
    proc, info = launch_stack(argv, log=log_dir / "stack.out", ready_file=log_dir / "ready.json", env=env)
    try:
        yield {"worker": info["workers"][0]["url"], "front": info["api_url"].removesuffix("/v1")}
    finally:
        stop_group(proc, signal.SIGINT)


def served_name(base: str) -> str:
    """The first model a running OpenAI server lists (vllm.benchmarks.serve
    sends OPENAI_API_KEY, as the client does)."""
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def measure(bases: dict[str, str], model: Path, names: dict[str, str], spec: dict) -> dict[tuple[str, int], list[dict]]:
    """Rounds of every concurrency against every base (the order rotates per
    round); ``names``: the model name each base serves."""
    for key, base in bases.items():  # warm-up: first requests allocate and compile
        run_client(base, model, names[key], 1, 2, spec)
    runs: dict[tuple[str, int], list[dict]] = {(k, c): [] for k in bases for c in spec["concurrency"]}
    keys = list(bases)
    for r in range(spec["rounds"]):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for conc in spec["concurrency"]:
            for key in order:
                result = run_client(bases[key], model, names[key], conc, conc * spec["prompts_per_client"], spec)
                if result["completed"] != conc * spec["prompts_per_client"]:
                    raise RuntimeError(f"{key}: only {result['completed']} requests completed at concurrency {conc}")
                runs[key, conc].append({f: result[f] for f in KEEP})
                say(
                    f"round {r + 1}/{spec['rounds']} concurrency {conc} {key}: "
                    f"{result['output_throughput']:.2f} tok/s, median TTFT {result['median_ttft_ms']:.0f} ms"
                )
    return runs


def serving_rows(
    model: Path, spec: dict, work: Path, targets: dict[str, str] | None = None, names: dict[str, str] | None = None
) -> list[dict]:
    """Rows ``{target, concurrency, tok_s, median_ttft_ms, median_tpot_ms, runs}``
    (medians over rounds): the native server and the stack started here, or
    the running ``targets`` (name -> base URL), each asked for its ``names``
    entry (default: the first model it lists)."""
    import qwen_vllm

    qwen_vllm.register()  # the benchmark client loads the model's QWenTokenizer
    if targets:
        names = {k: (names or {}).get(k) or served_name(u) for k, u in targets.items()}
        return median_rows(measure(targets, model, names, spec), spec)
    return median_rows(started_runs(model, spec, work), spec)


def native_env() -> dict[str, str]:
    """A native vLLM server's environment: the worker's CPU binding and KV-cache
    size, every plugin loaded."""
    from qwen_vllm.runtime.cpu import apply_cpu_defaults

    env = dict(os.environ)
    apply_cpu_defaults(1, env)
    env.pop("VLLM_PLUGINS", None)
    return env


def native_args(dtype: str, load_format: str, max_model_len: int, compiled: bool = False) -> list[str]:
    """The engine flags every bench server gets (eager as the jobs run: engine.eager)."""
    from qwen_vllm.bench.engine import eager

    flags = ["--enforce-eager"] if eager(compiled) else []
    return [*flags, "--dtype", dtype, "--load-format", load_format, "--max-model-len", str(max_model_len)]


def started_runs(model: Path, spec: dict, work: Path) -> dict[tuple[str, int], list[dict]]:
    from qwen_vllm.bench.engine import model_gib, wait_for_memory

    name = model.resolve().name
    env = native_env()
    engine_args = native_args(spec["dtype"], spec["load_format"], spec["max_model_len"], spec["compiled"])
    need = model_gib(str(model), spec["dtype"]) * 1.1 + float(env["VLLM_CPU_KVCACHE_SPACE"]) + 2.0
    runs: dict[tuple[str, int], list[dict]] = {}

    def add(measured: dict[tuple[str, int], list[dict]]) -> None:
        for key, rs in measured.items():
            runs.setdefault(key, []).extend(rs)

    def native(part: int, rounds: int) -> None:
        wait_for_memory(need, "native vLLM server")
        log = work / f"native-{part}.log"
        with native_server(model, name, spec["base_port"] + 3, engine_args, env, log) as bases:
            add(measure(bases, model, dict.fromkeys(bases, name), {**spec, "rounds": rounds}))

    # Native, stack, native again (rounds split): one engine at a time, and
    # drift of a shared machine over the run weighs on both sides alike.
    first = (spec["rounds"] + 1) // 2
    native(1, first)
    wait_for_memory(need, "qwen-vllm stack")
    with stack(model, spec["base_port"], engine_args, env, work / "stack") as bases:
        add(measure(bases, model, dict.fromkeys(bases, name), spec))
    if spec["rounds"] > first:
        native(2, spec["rounds"] - first)
    return runs


def median_rows(runs: dict[tuple[str, int], list[dict]], spec: dict) -> list[dict]:
    import statistics

    med = statistics.median
    return [
        {
            "target": key,
            "concurrency": conc,
            "new_tokens": spec["new_tokens"],
            "tok_s": med(r["output_throughput"] for r in rs),
            "median_ttft_ms": med(r["median_ttft_ms"] for r in rs),
            "median_tpot_ms": med(r["median_tpot_ms"] for r in rs),
            "runs": rs,
        }
        for (key, conc), rs in runs.items()
    ]
