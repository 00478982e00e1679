"""Plugin benchmarks (issue: Qwen v1 on current vLLM).

1. Engine start-up: a Qwen v1 fixture through the plugin vs the same weights
   converted to Qwen2ForCausalLM (stock vLLM path), each in a fresh process,
   alternating, median of N runs. Ratio ~1 means the plugin costs nothing.
2. Tokenizer encode throughput: QWenTokenizer.encode vs raw tiktoken with the
   same ranks/regex/specials on ~1 MB of mixed text, median of N runs.

Prints a ratio table and writes results/bench_plugin.json.
    python scripts/bench_plugin.py [--runs 3] [--skip-startup]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qwen_vllm.bench.engine import save_report
from qwen_vllm.bench.report import run_python

STARTUP_SNIPPET = """
import sys, time
t0 = float(sys.argv[2])
from vllm import LLM
llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=2048)
from qwen_vllm.bench.engine import emit_result
emit_result({"ready_s": time.time() - t0})
"""

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it? ",
    "你好，世界！今天天气怎么样？我想去北京看看长城。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n",
    "emoji 🦙🙂 and numbers 3.14159 2718281828 and   spaces\t\ttabs\n",
    "<|im_start|>user\nhello<|im_end|>\n",
    "Ωmega русский العربية 日本語 한국어 ",
]


def mixed_text(size: int) -> str:
    parts, total, i = [], 0, 0
    while total < size:
        piece = CORPUS[i % len(CORPUS)] + f"{i} "
        parts.append(piece)
        total += len(piece.encode())
        i += 1
    return "".join(parts)


def startup_seconds(model_dir: str) -> float:
    env = dict(os.environ, VLLM_CACHE_ROOT=tempfile.mkdtemp(prefix="bench-vllm-cache-"))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    argv = ["-c", STARTUP_SNIPPET, model_dir, str(time.time())]
    return run_python(argv, env=env, what=f"engine for {model_dir}", timeout=900)["ready_s"]


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--out", default="results/bench_plugin.json")
    args = parser.parse_args(argv)

    from qwen_vllm.checkpoints.convert import convert_to_qwen2
    from qwen_vllm.checkpoints.fixtures import make_model
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-plugin-"))
    qwen = make_model(work / "qwen-v1", "random")
    result: dict = {}

    tok = QWenTokenizer(str(qwen / "qwen.tiktoken"))
    text = mixed_text(1_000_000)
    raw = tok.tokenizer  # the same tiktoken Encoding, called directly
    assert tok.encode(text) == raw.encode(text, allowed_special="all")
    print(f"tokenizer: {len(text.encode()) / 1e6:.2f} MB, {len(raw.encode(text, allowed_special='all'))} tokens", file=sys.stderr)
    t_raw, t_ours = [], []
    for _ in range(args.runs):  # interleaved, so machine noise hits both alike
        t_raw.append(median_time(lambda: raw.encode(text, allowed_special="all"), 1))
        t_ours.append(median_time(lambda: tok.encode(text), 1))
    mb = len(text.encode()) / 1e6
    result["tokenizer"] = {
        "mb": mb,
        "tiktoken_mb_per_s": mb / statistics.median(t_raw),
        "qwen_tokenizer_mb_per_s": mb / statistics.median(t_ours),
        "ratio": statistics.median(t_raw) / statistics.median(t_ours),
    }

    if not args.skip_startup:
        qwen2 = convert_to_qwen2(qwen, work / "qwen2")
        plugin, stock = [], []
        for i in range(args.runs):
            print(f"start-up run {i + 1}/{args.runs} ...", file=sys.stderr)
            plugin.append(startup_seconds(str(qwen)))
            stock.append(startup_seconds(str(qwen2)))
        result["startup"] = {
            "plugin_qwen_v1_s": statistics.median(plugin),
            "stock_qwen2_s": statistics.median(stock),
            "ratio": statistics.median(plugin) / statistics.median(stock),
            "runs": {"plugin": plugin, "stock": stock},
        }

    print("\n| measure | ours | anchor | ratio (ours/anchor) |\n|---|---|---|---|")
    t = result["tokenizer"]
    print(f"| encode MB/s (1 MB mixed) | {t['qwen_tokenizer_mb_per_s']:.2f} | {t['tiktoken_mb_per_s']:.2f} (raw tiktoken) | {t['ratio']:.3f} |")
    if "startup" in result:
        s = result["startup"]
        print(f"| engine start-up s (median) | {s['plugin_qwen_v1_s']:.1f} | {s['stock_qwen2_s']:.1f} (Qwen2 copy) | {s['ratio']:.3f} |")
    return save_report(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
