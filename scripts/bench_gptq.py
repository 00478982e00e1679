"""GPTQ benchmark on CPU: memory and speed of Int4 and Int8 fixtures vs the
same model in float.

1. Kernel: one linear at a Qwen-1.8B MLP shape, qwen-vllm's GPTQ kernel
   (plugin/cpu_gptq.py) vs vLLM's CPUWNA16 (where this CPU's vLLM library has
   it) vs torch's float linear, per activation dtype and batch size M; and
   Qwen v1's lm_head (plugin/lm_head.py): vLLM's bf16 copy vs the int8 rows
   on vLLM's oneDNN W8A8 GEMM vs PyTorch's weight-only int8 kernel.
2. Engine: a Qwen-1.8B-shaped fixture (hidden 2048, 16 heads, MLP 5504, a few
   layers; random weights, GPTQ group 128 like Qwen's) written as GPTQ Int4,
   Int8 and float16; each engine (Int4 and Int8 in bfloat16, float bf16 and
   fp32) in a fresh process, started once: weight bytes on disk, process-tree
   RSS after start-up, then N rounds of decode tokens/s at batch 1 and 8 and
   prefill tokens/s (medians of the N rounds).

Prints ratio tables and writes results/bench_gptq.json.
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
    "int4_bf16": ("int4", "bfloat16"),  # vLLM's W4A8 on AMX, W4A16 on AVX-512, qwen-vllm's on AVX2
    "int8_bf16": ("int8", "bfloat16"),  # qwen-vllm's kernel on every CPU
    "float_bf16": ("float", "bfloat16"),
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
    """qwen-vllm's Int4 kernel (plugin/cpu_gptq.py) vs vLLM's CPUWNA16 (where
    this CPU's vLLM library has it; W4A8 for bf16 on AMX) vs torch's float
    linear, for one [k -> n] linear (Qwen-1.8B's MLP up). (Int8 is a float
    linear on dequantized weights: the float column.)"""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import (
        CPUWNA16LinearKernel,
    )

    from qwen_vllm.checkpoints.gptq_pack import quantize_rtn, vllm_gptq_layer
    from qwen_vllm.plugin import cpu_gptq

    def prepared(kernel_cls, t, bits):
        kernel, layer = vllm_gptq_layer(kernel_cls, t, bits, group, dtype)
        return lambda x: kernel.apply_weights(layer, x)

    native = cpu_gptq.vllm_native_int4()
    torch._C._cpu._init_amx()  # vLLM's AMX kernels need the permission an engine's oneDNN asks for
    torch.manual_seed(0)
    weight = torch.randn(n, k) / 45
    t4 = quantize_rtn(weight, 4, group)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):  # vLLM runs GPTQ in these only
        name = str(dtype).removeprefix("torch.")
        theirs = prepared(CPUWNA16LinearKernel, t4, 4) if native and dtype != torch.float32 else None  # no fp32 op
        cpu_gptq.vllm_native_int4 = lambda: False  # ours, as it runs on AVX2
        int4 = prepared(cpu_gptq.TorchGPTQLinearKernel, t4, 4)
        dense = weight.to(dtype)
        for m in (1, 8, 32, 128, 512):
            x = torch.randn(m, k).to(dtype)
            row = {
                "ours_int4_ms": median_ms(lambda: int4(x), runs),
                "vllm_int4_ms": median_ms(lambda: theirs(x), runs) if theirs else None,
                "float_linear_ms": median_ms(lambda: torch.nn.functional.linear(x, dense), runs),
            }
            out[f"{name} m{m}"] = row
            print(f"kernel {name} m={m}: {row}", file=sys.stderr)
    return {"shape": [k, n], "group_size": group, "vllm_native_int4": native, "rows": out}


def bench_lm_head(runs: int, vocab: int = 151936, hidden: int = 2048) -> dict:
    """Qwen v1's lm_head (plugin/lm_head.py) at the Qwen-1.8B shape, bf16: vLLM's
    packed bf16 copy (the default), the int8 rows on vLLM's oneDNN W8A8 GEMM
    (the opt-in) and PyTorch's weight-only int8 kernel (its path without oneDNN)."""
    import torch
    from vllm import _custom_ops

    from qwen_vllm.plugin.lm_head import QWenLMHeadMethod

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) / 45).to(torch.bfloat16)

    def prepared(int8: bool, onednn: bool):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        layer.params_dtype = torch.bfloat16
        method, saved = QWenLMHeadMethod(int8), _custom_ops._supports_onednn
        _custom_ops._supports_onednn = onednn and saved
        try:
            method.process_weights_after_loading(layer)
        finally:
            _custom_ops._supports_onednn = saved
        return lambda x: method.apply(layer, x)

    heads = {"bf16_ms": prepared(False, True), "int8_w8a8_ms": prepared(True, True), "int8_weight_only_ms": prepared(True, False)}
    rows = {}
    for m in (1, 8, 32):
        x = torch.randn(m, hidden).to(torch.bfloat16)
        rows[f"m{m}"] = row = {name: median_ms(lambda f=f: f(x), runs) for name, f in heads.items()}
        print(f"lm_head m={m}: {row}", file=sys.stderr)
    return {"shape": [vocab, hidden], "rows": rows}


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

    result: dict = {"kernel": bench_kernel(max(args.runs, 5)), "lm_head": bench_lm_head(max(args.runs, 5))}
    if not args.skip_engine:
        from qwen_vllm.checkpoints.fixtures import make_model

        work = Path(args.fixtures) if args.fixtures else Path(tempfile.mkdtemp(prefix="bench-gptq-"))
        shape = dict(hidden_size=2048, num_layers=args.layers, num_heads=16, mlp_width=5504, seq_length=2048)
        kinds = {
            "int4": dict(gptq_bits=4, gptq_group_size=128),
            "int8": dict(gptq_bits=8, gptq_group_size=128),
            "float": dict(dtype=__import__("torch").float16),
        }
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
    print(f"\nKernel, one linear {k['shape'][0]} -> {k['shape'][1]} (group {k['group_size']}), median ms; "
          "ratios are float / quantized:")  # fmt: skip
    print("| dtype, M | Int4 qwen-vllm | Int4 vLLM | float linear | float / Int4 ours | float / Int4 vLLM |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    for key, row in k["rows"].items():
        o4, v4, f = row["ours_int4_ms"], row["vllm_int4_ms"], row["float_linear_ms"]
        v_ms, v_ratio = ("-", "-") if v4 is None else (f"{v4:.2f}", f"{f / v4:.2f}")
        print(f"| {key.replace(' m', ', ')} | {o4:.2f} | {v_ms} | {f:.2f} | {f / o4:.2f} | {v_ratio} |")
    h = result["lm_head"]
    print(f"\nlm_head {h['shape'][0]} x {h['shape'][1]}, bf16 activations, median ms; ratios are bf16 / int8:")
    print("| M | bf16 (vLLM oneDNN) | int8 W8A8 (vLLM oneDNN) | int8 weight-only (torch) | bf16 / W8A8 | bf16 / weight-only |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    for key, row in h["rows"].items():
        b, w8, wo = row["bf16_ms"], row["int8_w8a8_ms"], row["int8_weight_only_ms"]
        print(f"| {key[1:]} | {b:.2f} | {w8:.2f} | {wo:.2f} | {b / w8:.2f} | {b / wo:.2f} |")
    if "engine" not in result:
        return
    e, med = result["engine"], result["engine"]["median"]
    w = e["weight_bytes"]
    names = list(ENGINES)
    print(f"\nEngine, {e['shape']}, medians; ratio columns are quantized / float bf16:")
    print("| measure | " + " | ".join(names) + " | Int4/bf16 | Int8/bf16 |\n|---|" + "---|" * (len(names) + 2))
    for part, label in (("total", "weights on disk MB"), ("layers", "  of which layers MB")):
        a, b, c = w["int4"][part], w["int8"][part], w["float"][part]
        print(f"| {label} | {a / 1e6:.0f} | {b / 1e6:.0f} | {c / 1e6:.0f} | {2 * c / 1e6:.0f}* | {a / c:.2f} | {b / c:.2f} |")
    for metric, label, scale in (
        ("rss_bytes", "process-tree RSS MB", 1e6),
        ("decode_b1_tok_s", "decode tok/s, batch 1", 1),
        ("decode_b8_tok_s", "decode tok/s, batch 8", 1),
        ("prefill_tok_s", f"prefill tok/s, {e['prefill_tokens']} tokens", 1),
        ("startup_s", "engine start-up s", 1),
    ):
        v = {n: med[n][metric] for n in names}
        cells = " | ".join(f"{v[n] / scale:.1f}" for n in names)
        print(f"| {label} | {cells} | {v['int4_bf16'] / v['float_bf16']:.2f} | {v['int8_bf16'] / v['float_bf16']:.2f} |")
    print("* float32 weights: twice the float16 checkpoint (it is loaded from float16); weights on disk are bf16-equivalent")

if __name__ == "__main__":
    sys.exit(main())
