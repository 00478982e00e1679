"""Serving benchmark: the FastChat topology against plain vLLM, same traffic.

Targets, all on one model and measured in the same run, interleaved round by
round so a noisy machine hits them alike:
  (a) OpenAI front -> FastChat controller -> worker (``qwen-vllm stack``)
  (b) the worker's own /v1 (vLLM's server with our endpoint plugin)
  (c) plain ``python -m vllm.entrypoints.openai.api_server`` with our model plugin
Traffic: vLLM's own benchmark client (``vllm.benchmarks.serve``, called
directly: the ``vllm bench`` CLI needs the "vllm" distribution name), random
prompts, fixed output length (ignore_eos), streaming /v1/completions, at
each concurrency. Prints medians over rounds and the ratios (a)/(c) for
output tokens/s and median TTFT; writes JSON under results/.

    python scripts/bench_serving.py                      # tiny random fixture
    python scripts/bench_serving.py --model /path/Qwen-1_8B-Chat --rounds 5

(c) gets the same CPU binding and KV-cache size as the worker, so only the
serving path differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "a": "front -> controller -> worker",
    "b": "worker's own /v1",
    "c": "plain vLLM api_server",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="Qwen v1 checkpoint (default: the tiny random fixture)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts-per-client", type=int, default=6, help="requests per concurrent client per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--base-port", type=int, default=18100)
    p.add_argument("--engine-args", default="--enforce-eager --max-model-len 2048", help="vLLM flags for both servers")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serving.json")
    return p.parse_args()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"{what} not healthy after {timeout:.0f} s")


def run_client(base_url: str, model: Path, name: str, concurrency: int, args: argparse.Namespace) -> dict:
    """One vllm.benchmarks.serve run; returns its result dict."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", str(model), "--served-model-name", name,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--ignore-eos",
            "--num-prompts", str(concurrency * args.prompts_per_client), "--max-concurrency", str(concurrency),
            "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl",
        ]
    )  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # keep the table readable
        return main(bench_args)


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    import qwen_vllm
    from qwen_vllm.cpu_defaults import thread_binding

    qwen_vllm.register()  # the benchmark client loads the model's QWenTokenizer
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model = args.model
    if model is None:
        from qwen_vllm.fixtures import make_model

        model = make_model(work / "random", "random")
    name = model.resolve().name
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", thread_binding(1, sorted(os.sched_getaffinity(0))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    port_front, port_ctl, port_worker, port_plain = (args.base_port + i for i in range(4))
    engine_args = args.engine_args.split()
    stack = subprocess.Popen(
        [sys.executable, "-m", "qwen_vllm.stack", "--model", str(model), "--port", str(port_front),
         "--controller-port", str(port_ctl), "--worker-port", str(port_worker), "--log-dir", str(work / "stack"),
         "--", *engine_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    plain = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port_plain), *engine_args],
        env={k: v for k, v in env.items() if k != "VLLM_PLUGINS"},
        stdout=open(work / "plain.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        for line in stack.stdout:
            print(line, end="", file=sys.stderr)
            if line.startswith("Press Ctrl-C"):
                break
        else:
            raise SystemExit(f"the stack exited (code {stack.wait()}); logs in {work / 'stack'}")
        wait_http(f"http://127.0.0.1:{port_plain}/health", plain, 1800, "plain vLLM server")
        bases = {
            "a": f"http://127.0.0.1:{port_front}",
            "b": f"http://127.0.0.1:{port_worker}",
            "c": f"http://127.0.0.1:{port_plain}",
        }
        for key, base in bases.items():  # warm-up (first requests compile/allocate)
            run_client(base, model, name, 1, argparse.Namespace(**{**vars(args), "prompts_per_client": 2}))
        runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in args.concurrency} for k in bases}
        for r in range(args.rounds):
            order = list(bases)[r % 3 :] + list(bases)[: r % 3]
            for conc in args.concurrency:
                for key in order:
                    result = run_client(bases[key], model, name, conc, args)
                    runs[key][conc].append(result)
                    print(
                        f"round {r + 1} c={conc} ({key}) {result['output_throughput']:.1f} tok/s "
                        f"TTFT {result['median_ttft_ms']:.1f} ms",
                        file=sys.stderr,
                    )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(plain.pid, signal.SIGTERM)
        stack.send_signal(signal.SIGINT)
        for proc in (stack, plain):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def med(key: str, conc: int, field: str) -> float:
        return statistics.median(run[field] for run in runs[key][conc])

    summary = []
    header = (
        f"{'conc':>4} | {'tok/s (a)':>10} {'(b)':>8} {'(c)':>8} | {'TTFT ms (a)':>11} {'(b)':>8} {'(c)':>8} | "
        f"{'tok/s a/c':>9} {'TTFT a/c':>8}"
    )
    print(f"\nmodel {model} ({args.input_len} in / {args.output_len} out tokens, medians of {args.rounds} rounds)")
    for key, what in TARGETS.items():
        print(f"  ({key}) {what}")
    print(header)
    print("-" * len(header))
    for conc in args.concurrency:
        row = {
            "concurrency": conc,
            **{f"output_tok_s_{k}": med(k, conc, "output_throughput") for k in bases},
            **{f"median_ttft_ms_{k}": med(k, conc, "median_ttft_ms") for k in bases},
            **{f"median_tpot_ms_{k}": med(k, conc, "median_tpot_ms") for k in bases},
        }
        row["tok_s_ratio_a_c"] = row["output_tok_s_a"] / row["output_tok_s_c"]
        row["ttft_ratio_a_c"] = row["median_ttft_ms_a"] / row["median_ttft_ms_c"]
        summary.append(row)
        print(
            f"{conc:>4} | {row['output_tok_s_a']:>10.1f} {row['output_tok_s_b']:>8.1f} {row['output_tok_s_c']:>8.1f} | "
            f"{row['median_ttft_ms_a']:>11.1f} {row['median_ttft_ms_b']:>8.1f} {row['median_ttft_ms_c']:>8.1f} | "
            f"{row['tok_s_ratio_a_c']:>9.3f} {row['ttft_ratio_a_c']:>8.3f}"
        )
    print("targets: tok/s a/c >= 0.9, TTFT a/c <= 1.2")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keep = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "completed", "duration")
    args.out.write_text(
        json.dumps(
            {
                "model": str(model),
                "input_len": args.input_len,
                "output_len": args.output_len,
                "rounds": args.rounds,
                "targets": TARGETS,
                "summary": summary,
                "runs": {k: {str(c): [{f: r[f] for f in keep} for r in v] for c, v in d.items()} for k, d in runs.items()},
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}; server logs in {work}")
    if args.model is None:
        shutil.rmtree(model)  # the generated fixture
    return 0


if __name__ == "__main__":
    sys.exit(main())
