"""GPTQ Int4 benchmark: memory and speed of the Int4 fixture on the
CPU fallback kernel (qwen_vllm.plugin.cpu_gptq) vs the same model in float.

1. Kernel: one linear at a Qwen-1.8B MLP shape, fallback op vs torch's float
   matmul, median of N calls per batch size M.
2. Engine: a Qwen-1.8B-shaped fixture (hidden 2048, 16 heads, MLP 5504, a few
   layers; random weights, GPTQ group 128 like Qwen's) written as GPTQ Int4
   and as float16; each engine (Int4 in float16, float16, float32) in a
   fresh process, started once: weight bytes on disk, process-tree RSS
   after start-up, then N rounds of decode tokens/s at batch 1 and 8 and
   prefill tokens/s (medians of the N rounds).

Prints a ratio table (Int4 / float16, Int4 / float32) and writes
results/bench_gptq.json.
    python scripts/bench_gptq.py [--runs 3] [--layers 4] [--new-tokens 16] [--prefill 512] [--skip-engine]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qwen_vllm.bench.engine import save_report
from qwen_vllm.bench.report import run_python

# One engine, one configuration: prints a JSON line "RESULT {...}".
ENGINE_SNIPPET = r"""
import json, os, sys, time
import psutil

def tree_rss():
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])

if __name__ == "__main__":
    model, dtype, new_tokens, prefill_len, rounds = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0)
    startup = time.perf_counter() - t0
    rss = tree_rss()
    decode = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prefill = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    def prompt(i, n):
        return TokensPrompt(prompt_token_ids=[(1000 + 7 * i + j) % 150000 for j in range(n)])
    llm.generate([prompt(0, 16)], decode, use_tqdm=False)  # warm-up
    out = {"startup_s": startup, "rss_bytes": rss, "quantization": llm.llm_engine.model_config.quantization}
    for r in range(rounds):
        for batch in (1, 8):
            t = time.perf_counter()
            res = llm.generate([prompt(i + r, 16) for i in range(batch)], decode, use_tqdm=False)
            tok_s = sum(len(x.outputs[0].token_ids) for x in res) / (time.perf_counter() - t)
            out.setdefault(f"decode_b{batch}_tok_s", []).append(tok_s)
        t = time.perf_counter()
        llm.generate([prompt(r, prefill_len)], prefill, use_tqdm=False)
        out.setdefault("prefill_tok_s", []).append(prefill_len / (time.perf_counter() - t))
    from qwen_vllm.bench.engine import emit_result
    emit_result(out)
    llm.llm_engine.engine_core.shutdown()
"""

ENGINES = {  # name -> (checkpoint key, dtype)
    "int4_fp16": ("int4", "float16"),
    "float_fp16": ("float", "float16"),
    "float_fp32": ("float", "float32"),
}


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_kernel(runs: int, k: int = 2048, n: int = 5504, group: int = 128) -> dict:
    """Fallback op vs torch matmul for one [k -> n] linear (Qwen-1.8B's MLP up)."""
    import torch

    from qwen_vllm.checkpoints.gptq_pack import quantize_rtn, unpack_int32
    from qwen_vllm.plugin import cpu_gptq

    cpu_gptq.install()
    torch.manual_seed(0)
    t = quantize_rtn(torch.randn(n, k) / 45, 4, group)
    q = unpack_int32(t.qweight, 4, dim=0)  # [k, n]
    # The CPUWNA16 layout the op receives: blocks of 16 output channels.
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    packed = pack_quantized_values_into_int32(q, scalar_types.uint4b8, 1)
    q_weight = packed.view(k, -1, 2).permute(1, 0, 2).reshape(-1, 2 * k).contiguous()
    scales = t.scales.half()
    w32 = ((q - 8).float() * scales.float().repeat_interleave(group, 0)).contiguous()  # [k, n]
    # torch's float layers as vLLM runs them: F.linear on [n, k] weights (x @ w
    # on a [k, n] half weight takes a slow path on AVX2, 20x slower).
    linear = torch.nn.functional.linear
    wt32 = w32.t().contiguous()
    wt16 = wt32.half()
    out = {}
    for m in (1, 8, 128):
        x16 = torch.randn(m, k).half()
        x32 = x16.float()
        y = torch.empty(m, n, dtype=torch.float16)
        row = {
            "fallback_int4_fp16_ms": median_ms(
                lambda: torch.ops._C.cpu_gemm_wna16(x16, q_weight, y, scales, None, None, 8, "vec"), runs
            ),
            "torch_fp16_ms": median_ms(lambda: linear(x16, wt16), runs),
            "torch_fp32_ms": median_ms(lambda: linear(x32, wt32), runs),
        }
        torch.ops._C.cpu_gemm_wna16(x16, q_weight, y, scales, None, None, 8, "vec")
        row["max_abs_err_vs_fp32"] = (y.float() - linear(x32, wt32)).abs().max().item()
        out[f"m{m}"] = row
        print(f"kernel m={m}: {row}", file=sys.stderr)
    return {"shape": [k, n], "group_size": group, "rows": out}


def weight_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes on disk: the whole checkpoint, and the transformer layers alone
    (what GPTQ quantizes; wte and lm_head stay float16 in Qwen's Int4 models
    and dominate a 4-layer fixture)."""
    from safetensors import safe_open

    layers = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith("transformer.h."):
                    t = f.get_slice(name)
                    layers += math.prod(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
    return {"total": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")), "layers": layers}


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}


def run_engine(model_dir: Path, dtype: str, new_tokens: int, prefill: int, rounds: int) -> dict:
    env = dict(os.environ, VLLM_CACHE_ROOT=tempfile.mkdtemp(prefix="bench-gptq-cache-"))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(os.sched_getaffinity(0)) - 1}")
    argv = ["-c", ENGINE_SNIPPET, str(model_dir), dtype, str(new_tokens), str(prefill), str(rounds)]
    return run_python(argv, env=env, what=f"engine {model_dir} ({dtype})", timeout=3600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds per engine (kernel: at least 5 calls)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--fixtures", help="directory to keep (and reuse) the two fixture checkpoints in")
    parser.add_argument("--out", default="results/bench_gptq.json")
    args = parser.parse_args(argv)

    result: dict = {"kernel": bench_kernel(max(args.runs, 5))}
    if not args.skip_engine:
        from qwen_vllm.checkpoints.fixtures import make_model

        work = Path(args.fixtures) if args.fixtures else Path(tempfile.mkdtemp(prefix="bench-gptq-"))
        shape = dict(hidden_size=2048, num_layers=args.layers, num_heads=16, mlp_width=5504, seq_length=2048)
        kinds = {"int4": dict(gptq_bits=4, gptq_group_size=128), "float": dict(dtype=__import__("torch").float16)}
        dirs = {}
        for key, kwargs in kinds.items():
            d = work / f"{key}-l{args.layers}"
            dirs[key] = d if (d / "config.json").exists() else make_model(d, "random", **kwargs, **shape)
        runs: dict[str, dict] = {}
        for name, (key, dtype) in ENGINES.items():
            print(f"engine {name}: {args.runs} rounds ...", file=sys.stderr)
            runs[name] = run_engine(dirs[key], dtype, args.new_tokens, args.prefill, args.runs)
        median = {
            name: {m: statistics.median(v) if isinstance(v, list) else v for m, v in r.items() if m != "quantization"}
            for name, r in runs.items()
        }
        result["engine"] = {
            "shape": shape,
            "new_tokens": args.new_tokens,
            "prefill_tokens": args.prefill,
            "weight_bytes": {key: weight_bytes(d) for key, d in dirs.items()},
            "median": median,
            "quantization": {name: r["quantization"] for name, r in runs.items()},
            "runs": runs,
        }
    print_table(result)
    return save_report(result, args.out)


def print_table(result: dict) -> None:
    k = result["kernel"]
    print(f"\nKernel, one linear {k['shape'][0]} -> {k['shape'][1]} (group {k['group_size']}), median ms:")
    print("| M | Int4 fallback (fp16 in/out) | torch fp16 | torch fp32 | Int4 / fp16 | Int4 / fp32 |\n|---|---|---|---|---|---|")
    for m, row in k["rows"].items():
        q, h, f = row["fallback_int4_fp16_ms"], row["torch_fp16_ms"], row["torch_fp32_ms"]
        print(f"| {m[1:]} | {q:.2f} | {h:.2f} | {f:.2f} | {q / h:.2f} | {q / f:.2f} |")
    if "engine" not in result:
        return
    e, med = result["engine"], result["engine"]["median"]
    w = e["weight_bytes"]
    print(f"\nEngine, {e['shape']}, medians; ratio columns are Int4 / float:")
    print("| measure | Int4 (fp16) | float16 | float32 | Int4/fp16 | Int4/fp32 |\n|---|---|---|---|---|---|")
    for part, label in (("total", "weights on disk MB"), ("layers", "  of which layers MB")):
        a, b = w["int4"][part], w["float"][part]
        print(f"| {label} | {a / 1e6:.0f} | {b / 1e6:.0f} | {2 * b / 1e6:.0f}* | {a / b:.2f} | {a / (2 * b):.2f} |")
    for metric, label, scale in (
        ("rss_bytes", "process-tree RSS MB", 1e6),
        ("decode_b1_tok_s", "decode tok/s, batch 1", 1),
        ("decode_b8_tok_s", "decode tok/s, batch 8", 1),
        ("prefill_tok_s", f"prefill tok/s, {e['prefill_tokens']} tokens", 1),
        ("startup_s", "engine start-up s", 1),
    ):
        a, b, c = (med[n][metric] for n in ("int4_fp16", "float_fp16", "float_fp32"))
        print(f"| {label} | {a / scale:.1f} | {b / scale:.1f} | {c / scale:.1f} | {a / b:.2f} | {a / c:.2f} |")
    print("* float32 weights: twice the float16 checkpoint (it is loaded from float16)")


if __name__ == "__main__":
    sys.exit(main())
