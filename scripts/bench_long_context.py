"""Benchmark: what Qwen's long context (dynamic NTK + LogN) costs on vLLM.

Side by side, same shape, dummy weights (vLLM ``load_format="dummy"``), each
engine in its own subprocess (one alive at a time), fresh random prompts every
repeat (no prefix-cache hits on either side), medians over repeats (and over
``--rounds``, which alternate which side starts first):

1. Short prompts: ``max_model_len = seq_length`` (the default: plain RoPE,
   the path vLLM had before long context) vs ``max_model_len = --long-len``
   (NTK rotary + LogN installed, M-RoPE positions, prefix caching off).
   Output tokens/s of a batch, and memory (PSS) of the engine processes
   (same KV-cache space on both sides, sized for --long-len).
2. One prompt of 4 x seq_length: prefill tokens/s (prompt / time to first
   token) and decode tokens/s through the long path (alpha 7, LogN), against
   the same shape whose seq_length covers the prompt (plain RoPE, no long path).

    python scripts/bench_long_context.py                    # Qwen-1.8B shape, 8192 vs 32768
    python scripts/bench_long_context.py --seq-length 2048 --long-len 8192 --long-prompt-seq-length 512

The Qwen-1.8B shape: hidden 2048, 24 layers, 16 heads, intermediate_size 11008,
vocab 151936 (public config.json). A 4 x 8192 prompt takes hours on two CPU
cores, so part 2 uses --long-prompt-seq-length (default 512: a 2048-token prompt).
Writes results/bench_long_context.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qwen_vllm.bench.engine import emit_result, write_json
from qwen_vllm.bench.report import run_python

ROOT = Path(__file__).resolve().parent.parent
SHAPE_1_8B = {"hidden_size": 2048, "num_layers": 24, "num_heads": 16, "mlp_width": 5504}
VOCAB = 151936
GiB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=8192, help="config seq_length for part 1")
    p.add_argument("--long-len", type=int, default=32768, help="opted-in max_model_len for part 1")
    p.add_argument("--long-prompt-seq-length", type=int, default=512, help="config seq_length for part 2")
    p.add_argument("--layers", type=int, default=SHAPE_1_8B["num_layers"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="measurements per engine")
    p.add_argument("--rounds", type=int, default=1, help="engine starts per side, alternating order")
    p.add_argument("--compile", action="store_true", help="vLLM's default torch.compile instead of enforce_eager")
    p.add_argument("--skip-short", action="store_true")
    p.add_argument("--skip-long-prompt", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_long_context.json")
    p.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine (JSON spec)
    return p.parse_args(argv)


def kv_bytes_per_token(layers: int, dtype: str) -> int:
    size = 2 if dtype in ("bfloat16", "float16") else 4
    return layers * 2 * SHAPE_1_8B["hidden_size"] * size


def write_model(root: Path, seq_length: int, layers: int) -> Path:
    """Config and tokenizer of a Qwen-1.8B-shaped checkpoint (weights: vLLM's dummy loader)."""
    from qwen_vllm.checkpoints.fixtures import qwen_config, write_checkpoint

    out = root / f"qwen-1.8b-shape-s{seq_length}-l{layers}"
    if not (out / "config.json").is_file():
        cfg = qwen_config(
            SHAPE_1_8B["hidden_size"], layers, SHAPE_1_8B["num_heads"], SHAPE_1_8B["mlp_width"], seq_length=seq_length
        )
        write_checkpoint(out, cfg, {}, shards=1)
    return out


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its children (shared pages counted once)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_full_info().pss for p in [proc, *proc.children(recursive=True)])


# -- one engine (runs in a subprocess) ---------------------------------------------
def run_engine(spec: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(spec["seed"])

    def prompts(n: int, length: int) -> list:
        return [TokensPrompt(prompt_token_ids=torch.randint(0, 151000, (length,), generator=gen).tolist()) for _ in range(n)]

    def timed(batch: list, max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    kwargs = {"max_model_len": spec["max_model_len"]} if spec["max_model_len"] else {}
    llm = LLM(
        model=spec["model"],
        load_format="dummy",
        dtype=spec["dtype"],
        enforce_eager=not spec["compile"],
        disable_log_stats=False,  # per-request timestamps
        seed=0,
        max_num_seqs=spec.get("batch", 1),  # no warm-up buffers for 256 sequences (shared machine)
        **kwargs,
    )
    config = llm.llm_engine.vllm_config
    out = {
        "max_model_len": config.model_config.max_model_len,
        "long_context_path": config.model_config.uses_mrope,
        "prefix_caching": config.cache_config.enable_prefix_caching,
    }
    if spec["kind"] == "short":
        timed(prompts(spec["batch"], spec["prompt_len"]), spec["new_tokens"])  # warm-up
        times = [timed(prompts(spec["batch"], spec["prompt_len"]), spec["new_tokens"]) for _ in range(spec["repeats"])]
        out["output_tok_s"] = [spec["batch"] * spec["new_tokens"] / t for t in times]
        out["pss_gib"] = tree_pss(os.getpid()) / GiB
    else:
        timed(prompts(1, 64), 2)  # warm-up
        params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
        prefill, decode = [], []
        for _ in range(spec["repeats"]):
            (result,) = llm.generate(prompts(1, spec["prompt_len"]), params, use_tqdm=False)
            stats = result.metrics  # engine-core timestamps of this request
            prefill.append(spec["prompt_len"] / (stats.first_token_ts - stats.scheduled_ts))
            decode.append((spec["new_tokens"] - 1) / (stats.last_token_ts - stats.first_token_ts))
        out["prefill_tok_s"], out["decode_tok_s"] = prefill, decode
    llm.llm_engine.engine_core.shutdown()
    return out


def param_count(layers: int) -> int:
    h, mlp = SHAPE_1_8B["hidden_size"], SHAPE_1_8B["mlp_width"]
    return 2 * VOCAB * h + layers * (4 * h * h + 3 * h + 3 * h * mlp + 2 * h) + h


def wait_for_memory(need: int, timeout: float = 1800.0) -> None:
    """The machine is shared: start an engine only when its memory is free."""
    import psutil

    start = time.monotonic()
    while psutil.virtual_memory().available < need:
        if time.monotonic() - start > timeout:
            raise SystemExit(f"[bench] {need / GiB:.1f} GiB never became free; use --layers/--dtype to shrink")
        print(f"[bench] waiting for {need / GiB:.1f} GiB of free memory ...", file=sys.stderr, flush=True)
        time.sleep(30)


def launch(spec: dict, kv_gib: int, layers: int) -> dict:
    weight_bytes = param_count(layers) * (4 if spec["dtype"] == "float32" else 2)
    wait_for_memory(weight_bytes + kv_gib * GiB + 2 * GiB)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-%d" % (len(os.sched_getaffinity(0)) - 1))
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    label = f"{spec['kind']} seq_length={spec['seq_length']} max_model_len={spec['max_model_len'] or 'default'}"
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    return {"spec": spec, **run_python([__file__, "--engine", json.dumps(spec)], env=env, what=f"[bench] {label}")}


def median(values: list[float]) -> float:
    return statistics.median(values)


def pair(anchor: dict, ours: dict, kv_gib: int, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Run anchor and ours ``--rounds`` times, alternating which goes first
    (the machine is shared and drifts)."""
    runs: tuple[list[dict], list[dict]] = ([], [])
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for side in order:
            runs[side].append(launch((anchor, ours)[side], kv_gib, args.layers))
    assert not any(x["long_context_path"] for x in runs[0]) and all(x["long_context_path"] for x in runs[1])
    return runs


def pooled(runs: list[dict], key: str) -> float:
    """Median over every repeat of every round."""
    values = [v for run in runs for v in (run[key] if isinstance(run[key], list) else [run[key]])]
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine:
        emit_result(run_engine(json.loads(args.engine)))
        return 0
    from qwen_vllm.plugin.ntk import LongContextPlan

    common = {"dtype": args.dtype, "compile": args.compile, "repeats": args.repeats, "new_tokens": args.new_tokens}
    rows: list[tuple[str, float, float]] = []
    report: dict = {"args": {k: str(v) for k, v in vars(args).items() if k != "engine"}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-longctx-") as tmp:
        if not args.skip_short:
            model = write_model(Path(tmp), args.seq_length, args.layers)
            # Both sides get KV space for one --long-len sequence (vLLM insists on it).
            kv_gib = math.ceil(kv_bytes_per_token(args.layers, args.dtype) * args.long_len / GiB) + 1
            base = {**common, "kind": "short", "model": str(model), "seq_length": args.seq_length}
            base.update(batch=args.batch, prompt_len=args.prompt_len, seed=1)
            plain, long = pair({**base, "max_model_len": None}, {**base, "max_model_len": args.long_len}, kv_gib, args)
            report["runs"] += plain + long
            plan = LongContextPlan.of({"seq_length": args.seq_length}, args.long_len)
            head_dim = SHAPE_1_8B["hidden_size"] // SHAPE_1_8B["num_heads"]
            # cos/sin cache (head_dim per position) + LogN table (1), per alpha bucket
            tables = len(plan.alphas) * args.long_len * (head_dim + 1) * (4 if args.dtype == "float32" else 2)
            report["long_context_tables_mib"] = tables / (1 << 20)
            rows += [
                (f"short prompts: output tok/s (batch {args.batch})", pooled(plain, "output_tok_s"), pooled(long, "output_tok_s")),
                ("short prompts: engine PSS GiB", pooled(plain, "pss_gib"), pooled(long, "pss_gib")),
            ]
        if not args.skip_long_prompt:
            s = args.long_prompt_seq_length
            length = 4 * s
            long_model = write_model(Path(tmp), s, args.layers)
            anchor_model = write_model(Path(tmp), length + args.new_tokens, args.layers)
            kv_gib = math.ceil(kv_bytes_per_token(args.layers, args.dtype) * (length + args.new_tokens) / GiB) + 1
            base = {**common, "kind": "long", "prompt_len": length, "seed": 2}
            anchor, ours = pair(
                {**base, "model": str(anchor_model), "seq_length": length + args.new_tokens, "max_model_len": None},
                {**base, "model": str(long_model), "seq_length": s, "max_model_len": length + args.new_tokens},
                kv_gib,
                args,
            )
            report["runs"] += anchor + ours
            label = f"{length}-token prompt (4 x {s})"
            rows += [
                (f"{label}: prefill tok/s", pooled(anchor, "prefill_tok_s"), pooled(ours, "prefill_tok_s")),
                (f"{label}: decode tok/s", pooled(anchor, "decode_tok_s"), pooled(ours, "decode_tok_s")),
            ]
    print(f"\n{'measure':<48} {'anchor':>10} {'long ctx':>10} {'ratio':>7}")
    for name, anchor_value, ours_value in rows:
        print(f"{name:<48} {anchor_value:>10.2f} {ours_value:>10.2f} {ours_value / anchor_value:>7.3f}")
    print("anchor: plain RoPE (max_model_len = seq_length); long ctx: dynamic NTK + LogN path; medians")
    if "long_context_tables_mib" in report:
        print(f"long-context rotary + LogN tables at max_model_len {args.long_len}: {report['long_context_tables_mib']:.1f} MiB")
    report["table"] = [{"measure": n, "anchor": a, "long_context": o, "ratio": o / a} for n, a, o in rows]
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
