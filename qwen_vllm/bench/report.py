"""``qwen-vllm bench``: the Qwen README's speed/memory table on this stack, and
how it compares with what users would otherwise run.

Modes (each writes ``<out>/<mode>.md``, ``<mode>.json`` and ``<mode>.png``):

* ``profile``: the README's method: generate N tokens (default 2048) for batch 1
  and batch B through vLLMWrapper; tokens/s and peak memory. For a checkpoint
  (``--model DIR``) or any Qwen size by its real config shape with random
  weights (``--size 1.8B|7B|14B|72B``: vLLM's ``load_format="dummy"``, a Qwen v1
  directory without weights, so the plugin path is what is measured).
* ``versus``: the same work side by side in one run: raw ``vllm.LLM`` vs
  vLLMWrapper vs transformers ``generate`` on the converted Qwen2 copy (static
  batches), then serving: native vLLM OpenAI server vs FastChat worker vs OpenAI
  front, loaded by vLLM's own ``vllm.benchmarks.serve``.
* ``cpu-defaults``: the settings in ``cpu_defaults.py`` against vLLM's own CPU
  defaults (thread binding, KV-cache space, max batched tokens).

Every engine runs in its own process (``bench_engine.py``); figures are medians
over ``--rounds`` with targets interleaved, so a shared machine's noise hits
them alike; read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qwen_vllm.bench.engine import (
    RESULT_PREFIX,
    child_env,
    model_gib,
    say,
    wait_for_memory,
    weight_counts,
    write_json,
)
from qwen_vllm.bench.serving import stop_group
from qwen_vllm.bench.shapes import (
    GPTQ_GROUP_SIZE,
    SIZES,
    lm_head_variants,
    write_shape_model,
)
from qwen_vllm.runtime.ports import free_ports

# Goals the report checks (same machine, Qwen-1.8B shape fp32; docs/performance.md).
GOAL_VS_SERIAL = 4.0  # serving at concurrency 8 vs transformers one request at a time
GOAL_VS_STATIC = 2.0  # vLLMWrapper vs transformers static batching, batch 8-32
GOAL_INT4_DECODE = 2.0  # Int4 vs float decode tokens/s at batch 1 (bandwidth-bound: a quarter of the bytes)
GOAL_INT4_PREFILL = 0.8  # Int4 vs float prefill tokens/s at batch 1
GOAL_INT4_MEMORY = 0.5  # Int4 vs float peak memory


# -- running jobs -----------------------------------------------------------------
def run_job(spec: dict, env_extra: dict[str, str] | None = None) -> dict:
    """Run one bench_engine job in a fresh process; its progress goes to our stderr."""
    from qwen_vllm.runtime.cpu import on_cpu

    if spec["kind"] == "transformers" or on_cpu():  # the weights and the KV cache live in host memory
        kv = 0.0 if spec["kind"] == "transformers" else kv_gib(env_extra)
        wait_for_memory(model_gib(spec["model"], spec["dtype"]) * 1.1 + kv + 1.5, f"{spec['kind']} job")
    return run_python(["-m", "qwen_vllm.bench.engine", json.dumps(spec)], env=child_env(env_extra), what=f"bench job {spec['kind']}")


def run_python(argv: list[str], *, env: dict[str, str] | None = None, what: str = "bench job", timeout: float | None = None) -> dict:
    """``python ARGV`` in a session of its own, which hands back one result
    (``bench.engine.emit_result``); its other output goes to our stderr, and
    its processes (engines included) go with it. For ``qwen-vllm bench`` and
    the benchmark scripts alike."""
    proc = subprocess.Popen(
        [sys.executable, *argv], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )  # fmt: skip
    # A job silent past ``timeout`` is stopped (the read below then ends).
    watchdog = None if timeout is None else threading.Timer(timeout, stop_group, [proc])
    if watchdog is not None:
        watchdog.start()
    result = None
    try:
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX) :])
            else:
                print(line, end="", file=sys.stderr)
        proc.wait(timeout=120)  # the normal end: let the job shut its engine down itself
    except subprocess.TimeoutExpired:
        pass
    finally:
        if watchdog is not None:
            watchdog.cancel()
        stop_group(proc)  # interrupted or not: the job's engine processes go with it
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}); see the log above")
    return result


def kv_gib(env: dict[str, str] | None = None) -> float:
    """The KV-cache space an engine started with ``env`` will allocate (our default if unset)."""
    from qwen_vllm.runtime.cpu import DEFAULT_KVCACHE_GIB

    return float({**os.environ, **(env or {})}.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_KVCACHE_GIB)


# -- modes ------------------------------------------------------------------------
def base_spec(args: argparse.Namespace, model: Path) -> dict:
    prompt = 64 + getattr(args, "input_len", 0) + getattr(args, "prompt_tokens", 0) + getattr(args, "prefill_tokens", 0)
    max_len = min(args.seq_length, 256 * math.ceil((prompt + args.new_tokens + 64) / 256))
    return {
        "model": str(model),
        "load_format": args.load_format,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "compiled": args.compiled,
        "engine": {"max_model_len": max_len},
    }


def profile(args: argparse.Namespace, model: Path) -> dict:
    spec = {**base_spec(args, model), "kind": "vllm", "targets": ["wrapper"], "batches": sorted({1, args.batch})}
    job = run_job(spec)
    return {"rows": job["rows"], "engine": {k: v for k, v in job.items() if k != "rows"}}


def versus(args: argparse.Namespace, model: Path) -> dict:
    from qwen_vllm.bench.serving import serving_rows

    out: dict[str, Any] = {"offline": [], "serving": [], "ratios": {}, "goals": {}}
    if args.only in (None, "offline"):
        spec = {**base_spec(args, model), "batches": args.batches}
        vllm = run_job({**spec, "kind": "vllm", "targets": ["raw", "wrapper"]})
        hf = run_job({**spec, "kind": "transformers"})
        out["offline"] = vllm["rows"] + hf["rows"]
        out["peak_rss_gib"] = {"vllm": vllm["peak_rss_gib"], "transformers": hf["peak_rss_gib"]}
    if args.only in (None, "serving"):
        spec = {
            **base_spec(args, model),
            "max_model_len": base_spec(args, model)["engine"]["max_model_len"],
            "concurrency": args.concurrency,
            "input_len": args.input_len,
            "prompts_per_client": args.prompts_per_client,
            "base_port": args.base_port or free_ports(4),
        }
        targets = dict(t.split("=", 1) for t in args.target)
        names = dict(t.split("=", 1) for t in args.target_model)
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as work:
            out["serving"] = serving_rows(model, spec, Path(work), targets, names)
    tok = {(r["target"], r.get("batch", r.get("concurrency"))): r["tok_s"] for r in out["offline"] + out["serving"]}
    for b in args.batches if out["offline"] else []:
        out["ratios"][f"wrapper/raw batch {b}"] = tok["wrapper", b] / tok["raw", b]
        out["ratios"][f"wrapper/transformers batch {b}"] = tok["wrapper", b] / tok["transformers", b]
        if b >= 8:
            out["goals"][f"vLLMWrapper vs transformers static batch {b} >= {GOAL_VS_STATIC:g}x"] = (
                tok["wrapper", b] / tok["transformers", b] >= GOAL_VS_STATIC
            )
    served = list(dict.fromkeys(r["target"] for r in out["serving"]))
    for c in args.concurrency if "native" in served else []:
        for t in (t for t in served if t != "native"):
            out["ratios"][f"{t}/native concurrency {c}"] = tok[t, c] / tok["native", c]
    if out["offline"] and {"worker", "front"} <= set(served) and ("transformers", 1) in tok:
        top = max(args.concurrency)
        for t in ("worker", "front"):
            ratio = tok[t, top] / tok["transformers", 1]
            out["ratios"][f"{t} concurrency {top} / serial transformers"] = ratio
            if top >= 8:
                out["goals"][f"{t} concurrency {top} vs serial transformers >= {GOAL_VS_SERIAL:g}x"] = (
                    ratio >= GOAL_VS_SERIAL
                )
    return out


WITH_PRELOAD = "ours + LD_PRELOAD"


def cpu_variants(args: argparse.Namespace) -> dict[str, dict]:
    """name -> (environment, engine kwargs). All get our KV-cache size, so the
    first three differ in the thread binding and the preloaded tcmalloc and
    Intel OpenMP (runtime/cpu.py PRELOAD_LIBS, opt-in) only."""
    from qwen_vllm.runtime.cpu import (
        DEFAULT_KVCACHE_GIB,
        PRELOAD_ENV,
        preload_value,
        thread_binding,
    )

    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_KVCACHE_GIB))
    ours = {"VLLM_CPU_OMP_THREADS_BIND": thread_binding(1, sorted(os.sched_getaffinity(0))), "VLLM_CPU_KVCACHE_SPACE": kv,
            PRELOAD_ENV: "0"}  # fmt: skip
    variants = {
        "ours (bind all cores)": {"env": ours, "engine": {}},
        "vLLM default (reserve one core)": {"env": {**ours, "VLLM_CPU_OMP_THREADS_BIND": "auto"}, "engine": {}},
    }
    if args.compare_preload:
        if not preload_value(os.environ.get("LD_PRELOAD", "")):
            raise ValueError("--compare-preload: neither tcmalloc nor Intel OpenMP is installed (make setup)")
        variants[WITH_PRELOAD] = {"env": {**ours, PRELOAD_ENV: "1"}, "engine": {}}
    for mbt in args.max_batched_tokens:
        variants[f"ours + max_num_batched_tokens={mbt}"] = {"env": ours, "engine": {"max_num_batched_tokens": mbt}}
    return variants


def cpu_defaults(args: argparse.Namespace, model: Path) -> dict:
    rows, engines = [], {}
    for name, variant in cpu_variants(args).items():
        say(f"variant: {name}")
        spec = {**base_spec(args, model), "kind": "vllm", "targets": ["wrapper"], "batches": args.batches}
        spec["engine"] = {**spec["engine"], **variant["engine"]}
        spec["prompt_tokens"] = args.prompt_tokens
        job = run_job(spec, variant["env"])
        engines[name] = {k: v for k, v in job.items() if k != "rows"}
        rows += [{**r, "target": name} for r in job["rows"]]
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in rows}
    base = "vLLM default (reserve one core)"
    ratios = {f"{v} / {base} batch {b}": tok[v, b] / tok[base, b] for v in engines if v != base for b in args.batches}
    if WITH_PRELOAD in engines:
        ratios |= {f"LD_PRELOAD gain batch {b}": tok[WITH_PRELOAD, b] / tok["ours (bind all cores)", b] for b in args.batches}
    return {"rows": rows, "engines": engines, "ratios": ratios}


def lora(args: argparse.Namespace, model: Path) -> dict:
    """Tokens/s of a LoRA engine with 0, 1 and 4 distinct adapters in each batch,
    against the base model on a plain engine (a merged adapter costs exactly
    the base model's compute); host memory of the LoRA engine against the plain
    one. vLLM allocates every adapter slot (``max_loras``) when the engine starts,
    so the memory an extra adapter costs is the LoRA engine's excess per slot.
    Adapters: Qwen's finetune.py defaults (r=64 on all four targets)."""
    from qwen_vllm.checkpoints.lora import DEFAULT_MAX_LORAS, make_adapter

    spec = {**base_spec(args, model), "kind": "vllm", "batches": args.batches}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        adapters = [str(make_adapter(model, Path(tmp) / f"adapter-{i}", rank=args.rank, seed=i)) for i in range(DEFAULT_MAX_LORAS)]
        file_gib = sum(f.stat().st_size for f in Path(adapters[0]).iterdir()) / 2**30
        plain = run_job({**spec, "targets": ["wrapper"]})
        engine = {**spec["engine"], "enable_lora": True, "max_lora_rank": args.rank, "max_loras": len(adapters)}
        targets = ["lora-0", "lora-1", f"lora-{len(adapters)}"]
        with_lora = run_job({**spec, "engine": engine, "targets": targets, "adapters": adapters})
    rows = [dict(r, target="merged") for r in plain["rows"]] + with_lora["rows"]
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in rows}
    ratios = {f"{t}/merged batch {b}": tok[t, b] / tok["merged", b] for b in args.batches for t in targets}
    excess = with_lora["peak_rss_gib"] - plain["peak_rss_gib"]
    return {
        "rows": rows,
        "rank": args.rank,
        "adapters": len(adapters),
        "memory_gib": {
            "plain engine peak": plain["peak_rss_gib"],
            f"LoRA engine peak ({len(adapters)} adapter slots)": with_lora["peak_rss_gib"],
            "LoRA engine over plain": excess,
            "per adapter slot": excess / len(adapters),
            "one adapter's file": file_gib,
        },
        "ratios": ratios,
    }


def quant(args: argparse.Namespace, model: Path) -> dict:
    """GPTQ Int4/Int8 against the float model of the same shape (``--size``,
    dummy weights in GPTQ layout: the kernels and memory are the real ones),
    all in ``--dtype`` (the float one in ``--float-dtype`` if given): decode and
    prefill tokens/s at each batch size and peak memory, each engine in a fresh
    process; ``--int8-lm-head`` adds each model again with its lm_head in int8
    rows (plugin/lm_head.py), ``--int8-embedding`` its embedding too. Memory:
    the peak RSS of each engine's process tree, and what its loaded model
    holds of it (the plugin measures that in the worker)."""
    spec = {**base_spec(args, model), "kind": "vllm", "targets": ["raw", "prefill"], "batches": args.batches,
            "prefill_tokens": args.prefill_tokens, "tokens_per_sequence": {"prefill": args.prefill_tokens}}  # fmt: skip
    jobs: dict[str, dict] = {}
    layout: dict[str, tuple[int | None, bool, str]] = {}  # name -> (GPTQ bits, int8 lm_head, dtype)
    float_dtype = args.float_dtype or args.dtype
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        models: dict[str, tuple[Path, int | None]] = {"float": (model, None)}
        for bits in args.bits:
            models[f"int{bits}"] = (write_shape_model(args.size, Path(tmp) / f"int{bits}", gptq_bits=bits), bits)
        for name, (path, bits) in models.items():
            dtype = args.dtype if bits else float_dtype
            for suffix, config in lm_head_variants(args.int8_lm_head, args.int8_embedding):
                extra = {"additional_config": config} if config else {}
                jobs[name + suffix] = run_job({**spec, "model": str(path), "dtype": dtype, "engine": {**spec["engine"], **extra}})
                layout[name + suffix] = (bits, bool(config), dtype)
    rows = [dict(r, target=name) for name, job in jobs.items() for r in job["rows"] if r["target"] == "raw"]
    prefill = [dict(r, target=name, prompt_tokens=args.prefill_tokens) for name, job in jobs.items() for r in job["rows"] if r["target"] == "prefill"]  # fmt: skip
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in rows}
    pre = {(r["target"], r["batch"]): r["tok_s"] for r in prefill}
    memory = {name: job["peak_rss_gib"] for name, job in jobs.items()}
    model_memory = {name: job["model_gib"] for name, job in jobs.items()}
    ratios: dict[str, float] = {}
    goals: dict[str, bool] = {}
    for name in (n for n in jobs if n != "float"):
        for b in args.batches:
            ratios[f"{name}/float batch {b}"] = tok[name, b] / tok["float", b]
            ratios[f"{name}/float prefill batch {b}"] = pre[name, b] / pre["float", b]
        ratios[f"{name}/float peak memory"] = memory[name] / memory["float"]
        ratios[f"{name}/float model memory"] = model_memory[name] / model_memory["float"]
        if layout[name][0] == 4 and 1 in args.batches:
            label = "Int4" + name[len("int4"):]
            goals[f"{label} decode at batch 1 >= 2x float"] = ratios[f"{name}/float batch 1"] >= GOAL_INT4_DECODE
            goals[f"{label} prefill at batch 1 >= 0.8x float"] = ratios[f"{name}/float prefill batch 1"] >= GOAL_INT4_PREFILL
            goals[f"{label} peak memory <= 0.5x float"] = ratios[f"{name}/float peak memory"] <= GOAL_INT4_MEMORY
            goals[f"{label} model memory <= 0.5x float"] = ratios[f"{name}/float model memory"] <= GOAL_INT4_MEMORY
    float_kernel = "torch (oneDNN)" if float_dtype == args.dtype else f"torch, {float_dtype}"
    kernels = {n: float_kernel if bits is None else gptq_kernel(dtype, bits) for n, (bits, _, dtype) in layout.items()}
    bandwidth = read_bandwidth_gib_s()
    roofline = {}
    for name, (bits, head, dtype) in layout.items():
        step = decode_step_gib(model, dtype, bits, int8_lm_head=head)
        roofline[name] = {"gib_per_step": step, "tok_s": bandwidth / step, "achieved": tok[name, 1] / (bandwidth / step) if 1 in args.batches else None}
    return {"rows": rows, "prefill": prefill, "memory_gib": memory, "model_gib": model_memory, "kernels": kernels,
            "read_gib_s": bandwidth, "roofline": roofline, "ratios": ratios, "goals": goals}  # fmt: skip


def read_bandwidth_gib_s(gib: float = 1.0, reps: int = 7) -> float:
    """This machine's memory read bandwidth as torch sees it: the median time to
    sum a ``gib`` float32 tensor (far larger than any cache) on every core."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return gib / statistics.median(times)


def decode_step_gib(model: Path, dtype: str, gptq_bits: int | None, int8_lm_head: bool = False) -> float:
    """Bytes one decode step at batch 1 must read (GiB): every layer's weights
    and the lm_head (the embedding reads one row). Int4 layers: half a byte per
    weight plus an fp16-sized scale per 128 (vLLM and qwen-vllm alike); Int8 is
    dequantized at load on CPU, so it reads what float does; an int8 lm_head
    one byte per weight."""
    layer_weights, vocab = weight_counts(model)
    width = 2 if dtype in ("bfloat16", "float16") else 4
    layers = layer_weights * (0.5 + 2 / GPTQ_GROUP_SIZE) if gptq_bits == 4 else layer_weights * width
    return (layers + vocab * (1 if int8_lm_head else width)) / 2**30


def gptq_kernel(dtype: str, bits: int) -> str:
    """Which kernel runs this machine's GPTQ layers (plugin/cpu_gptq.py decides)."""
    from qwen_vllm.runtime.cpu import cpu_caps, on_cpu

    if not on_cpu():
        return "vLLM Marlin"
    return cpu_caps().int4_path(dtype) if bits == 4 else "qwen-vllm (dequantized at load)"


def llama_cpp(args: argparse.Namespace, model: Path) -> dict:
    from qwen_vllm.bench.llamacpp import llamacpp

    return llamacpp(args, model)


def admission(args: argparse.Namespace, model: Path) -> dict:
    from qwen_vllm.bench import stress

    return stress.admission(args, model)


def chaos(args: argparse.Namespace, model: Path) -> dict:
    from qwen_vllm.bench import stress

    return stress.chaos(args, model)


MODES = {
    "profile": profile,
    "versus": versus,
    "cpu-defaults": cpu_defaults,
    "lora": lora,
    "quant": quant,
    "llamacpp": llama_cpp,
    "admission": admission,
    "chaos": chaos,
}


# -- reporting --------------------------------------------------------------------
def table(header: list[str], lines: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def machine() -> str:
    """This machine for the report: CPU kind (vLLM loads a kernel library per
    kind, so figures differ between them), cores, memory, GPU if any."""
    from qwen_vllm.runtime.cpu import cpu_caps, on_cpu

    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{platform.machine()} {cpu_caps().isa}, {len(os.sched_getaffinity(0))} cores, {gib:.0f} GiB"
    if not on_cpu():
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def markdown(result: dict) -> str:
    mode, data = result["mode"], result["data"]
    head = (
        f"## qwen-vllm bench {mode}: {result['model_label']}, {result['dtype']}{', compiled' * result.get('compiled', False)}, "
        f"{result['new_tokens']} new tokens, median of {result['rounds']} round(s)\n\n"
        f"{result['date']} on {result['machine']}.\n"
    )
    parts = [head]
    if mode == "profile":
        parts.append(
            table(
                ["model", "batch", "new tokens", "tokens/s", "peak memory (GiB, RSS)"],
                [[result["model_label"], r["batch"], r["new_tokens"], r["tok_s"], r["peak_rss_gib"]] for r in data["rows"]],
            )
        )
    elif mode == "versus":
        tok = {(r["target"], r.get("batch", r.get("concurrency"))): r for r in data["offline"] + data["serving"]}
        if data["offline"]:
            batches = sorted({r["batch"] for r in data["offline"]})
            parts.append("Offline, output tokens/s (static batch of chat prompts):\n")
            parts.append(
                table(
                    ["batch", "raw vllm.LLM", "vLLMWrapper", "transformers", "wrapper/raw", "wrapper/transformers"],
                    [
                        [b, tok["raw", b]["tok_s"], tok["wrapper", b]["tok_s"], tok["transformers", b]["tok_s"],
                         tok["wrapper", b]["tok_s"] / tok["raw", b]["tok_s"],
                         tok["wrapper", b]["tok_s"] / tok["transformers", b]["tok_s"]]
                        for b in batches
                    ],
                )  # fmt: skip
            )
        if data["serving"]:
            concs = sorted({r["concurrency"] for r in data["serving"]})
            parts.append("\nServing (`vllm.benchmarks.serve`, streaming /v1/completions), output tokens/s and median TTFT:\n")
            parts.append(
                table(
                    ["concurrency", "native vLLM", "worker", "front", "worker/native", "front/native",
                     "TTFT ms native / worker / front"],
                    [
                        [c, tok["native", c]["tok_s"], tok["worker", c]["tok_s"], tok["front", c]["tok_s"],
                         tok["worker", c]["tok_s"] / tok["native", c]["tok_s"],
                         tok["front", c]["tok_s"] / tok["native", c]["tok_s"],
                         " / ".join(f"{tok[t, c]['median_ttft_ms']:.0f}" for t in ("native", "worker", "front"))]
                        for c in concs
                    ],
                )  # fmt: skip
            )
    elif mode == "lora":
        batches = sorted({r["batch"] for r in data["rows"]})
        tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
        names = ["merged", "lora-0", "lora-1", f"lora-{data['adapters']}"]
        parts.append(
            f"Output tokens/s, adapters of rank {data['rank']} on all four targets; `merged`: the base model on a "
            "plain engine (a merged adapter's compute), `lora-K`: a LoRA engine with K distinct adapters in each "
            "batch (round robin):\n"
        )
        parts.append(table(["batch", *names], [[b, *[tok[n, b] for n in names]] for b in batches]))
        parts.append("\nHost memory (GiB, RSS of the engine process tree):\n")
        parts.append(table(["", "GiB"], [[k, v] for k, v in data["memory_gib"].items()]))
    elif mode == "quant":
        batches = sorted({r["batch"] for r in data["rows"]})
        tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
        roof = data["roofline"]
        held = data.get("model_gib")  # runs before the plugin measured it have none
        parts.append(
            "Decode output tokens/s (raw vllm.LLM, greedy), peak host memory (GiB, engine process tree"
            + ("; model: what the loaded model holds of it" if held else "")
            + f"), and the batch-1 roofline: {data['read_gib_s']:.1f} GiB/s measured read bandwidth / bytes a "
            "decode step reads:\n"
        )
        parts.append(
            table(["model", "kernel", *[f"batch {b}" for b in batches], "peak GiB", *(["model GiB"] if held else []),
                   "GiB per step", "roofline tok/s", "batch 1 / roofline"],
                  [[n, k, *[tok[n, b] for b in batches], data["memory_gib"][n], *([held[n]] if held else []),
                    roof[n]["gib_per_step"], roof[n]["tok_s"],
                    "-" if roof[n]["achieved"] is None else f"{roof[n]['achieved']:.0%}"]
                   for n, k in data["kernels"].items()])
        )  # fmt: skip
        if data.get("prefill"):
            pre = {(r["target"], r["batch"]): r["tok_s"] for r in data["prefill"]}
            parts.append(f"\nPrefill prompt tokens/s ({data['prefill'][0]['prompt_tokens']}-token random prompts, one new token):\n")
            parts.append(table(["model", *[f"batch {b}" for b in batches]], [[n, *[pre[n, b] for b in batches]] for n in data["kernels"]]))
    elif mode == "llamacpp":
        concs = sorted({r["concurrency"] for r in data["rows"]})
        tok = {(r["target"], r["concurrency"]): r for r in data["rows"]}
        names = list(dict.fromkeys(r["target"] for r in data["rows"]))
        parts.append(
            f"Serving (`vllm.benchmarks.serve`, streaming /v1/completions), output tokens/s; ours: vLLM's server "
            f"with the plugin, dummy weights; llama.cpp: {data['llamacpp']} server on GGUF files of the same shape "
            "(random weights; it runs one request at a time):\n"
        )
        cell = lambda n, c, key: tok[n, c][key] if (n, c) in tok else "-"  # noqa: E731 (a failed target)
        parts.append(table(["concurrency", *names], [[c, *[cell(n, c, "tok_s") for n in names]] for c in concs]))
        parts.append("\nMedian time to first token (ms):\n")
        parts.append(table(["concurrency", *names], [[c, *[cell(n, c, "median_ttft_ms") for n in names]] for c in concs]))
        if data.get("failed"):
            parts.append("\nNot measured:\n")
            parts.append(table(["target", "why"], [[t, why] for t, why in data["failed"].items()]))
    elif mode == "admission":
        parts.append(
            f"One worker, `--max-num-seqs {data['max_num_seqs']}`, a burst of {data['requests']} equal requests "
            "(/v1/completions, ignore_eos) sent in order; latency by arrival position:\n"
        )
        parts.append(
            table(["wave", "positions", "median latency (s)", "vs first wave"],
                  [[w["wave"], w["positions"], w["median_s"], w["vs_first_wave"]] for w in data["waves"]])
        )  # fmt: skip
        parts.append("\nWhat a queue bound would give on this burst:\n")
        parts.append(
            table(["--max-queued-requests", "p99 latency of admitted (s)", "refused at once (429)"],
                  [[b["max_queued_requests"], b["admitted_p99_s"], f"{b['refused_share']:.0%}"] for b in data["bounds"]])
        )  # fmt: skip
    elif mode == "chaos":
        parts.append(
            f"`qwen-vllm stack --workers 2`, {data['clients']} streaming clients (openai SDK, default retries); "
            f"in the chaos phase a worker gets `kill -9` every {data['kill_every_s']:.0f} s once both are up "
            f"({data['stack_restarts']} restarts by the stack).\n"
        )
        keys = ["seconds", "kills", "sent", "completed", "client_retries", "sdk_retries", "failed", "wrong_replies",
                "p50_s", "p99_s", "rss_mib_start", "rss_mib_end", "rss_mib_max"]  # fmt: skip
        parts.append(table(["phase", *keys], [[p["phase"], *[p[k] for k in keys]] for p in data["phases"]]))
    else:
        batches = sorted({r["batch"] for r in data["rows"]})
        tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
        parts.append(
            table(
                ["variant", "OMP threads bind", "LD_PRELOAD", "max batched tokens", "KV cache (tokens)",
                 *[f"batch {b} tok/s" for b in batches]],
                [
                    [name, e["omp_threads_bind"], e.get("ld_preload") or "-", e["max_num_batched_tokens"],
                     e["kv_cache_tokens"], *[tok[name, b] for b in batches]]
                    for name, e in data["engines"].items()
                ],
            )  # fmt: skip
        )
    if data.get("ratios"):
        parts.append("\nRatios (same run):\n")
        parts.append(table(["ratio", "value"], [[k, v] for k, v in data["ratios"].items()]))
    if data.get("goals"):
        parts.append("\nGoals:\n")
        parts.append(table(["goal", "met"], [[k, "yes" if v else "no"] for k, v in data["goals"].items()]))
    return "\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> bool:
    """tokens/s vs batch size (offline) and vs concurrency (serving), one line
    per target; False (no file) for a report without such rows (chaos)."""
    data = result["data"]
    rows = data.get("rows", []) + data.get("offline", []) + data.get("serving", [])
    panels = [(x, [r for r in rows if x in r]) for x in ("batch", "concurrency")]
    panels = [(x, rows) for x, rows in panels if rows]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (x, rows) in zip(axes[0], panels):
        for target in dict.fromkeys(r["target"] for r in rows):
            pts = sorted((r[x], r["tok_s"]) for r in rows if r["target"] == target)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=target)
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(x)
        ax.set_ylabel("output tokens/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"qwen-vllm bench {result['mode']}: {result['model_label']} {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result["mode"]
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_json(paths["json"], result)
    paths["md"].write_text(markdown(result))
    if not plot(result, paths["png"]):
        del paths["png"]
    return paths


# -- command line -----------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    helps = {
        "profile": "tokens/s and peak memory generating N tokens at batch 1 and batch B (the Qwen README's table)",
        "versus": "raw vLLM vs vLLMWrapper vs transformers; native vLLM server vs worker vs front",
        "cpu-defaults": "our CPU defaults (thread binding, KV space, max batched tokens) vs vLLM's",
        "lora": "tokens/s with 0, 1 and 4 LoRA adapters per batch vs the merged model; memory per adapter",
        "quant": "GPTQ Int4/Int8 vs the float model of the same --size: decode tokens/s and peak memory",
        "llamacpp": "our server (float, GPTQ Int4) vs llama.cpp's (GGUF F16, Q4_0) on the same --size shape",
        "admission": "latency by queue position on one worker (what --max-queued-requests bounds)",
        "chaos": "the stack with 2 workers under streaming clients, calm vs a worker kill -9'ed every N s",
    }
    for mode, text in helps.items():
        p = modes.add_parser(mode, help=text, description=text)
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", type=Path, help="Qwen v1 checkpoint directory (default: a tiny random fixture)")
        src.add_argument("--size", choices=list(SIZES), help="a Qwen size by its real config shape, random weights")
        p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: bfloat16 on GPUs and CPUs with native bf16, else float32)")
        p.add_argument("--new-tokens", type=int, default=2048 if mode == "profile" else 32)
        p.add_argument("--rounds", type=int, default=1 if mode == "profile" else 3, help="medians over this many")
        p.add_argument("--out", type=Path, default=Path("results") / "bench", help="results folder")
        p.add_argument("--cpu-isa", choices=["avx2"],
                       help="run every engine as an AVX2-only x86 CPU does (vLLM's _C_AVX2, PyTorch, oneDNN and MKL "
                       "capped at AVX2), emulated on this AVX-512 CPU and its memory; llamacpp: give it a "
                       "llama.cpp built for AVX2 (--llamacpp-python)")  # fmt: skip
        p.add_argument("--compiled", action="store_true",
                       help="CPU: run vLLM compiled (torch.compile, what its servers do unless --enforce-eager) "
                       "instead of eager; about twice the start-up")  # fmt: skip
        if mode == "profile":
            p.add_argument("--batch", type=int, default=8, help="the batch size besides 1 (default 8)")
        elif mode in ("versus", "cpu-defaults", "lora", "quant"):
            p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32] if mode == "versus" else [1, 8])
        if mode == "versus":
            p.add_argument("--only", choices=["offline", "serving"], help="run one half only")
            p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
            p.add_argument("--input-len", type=int, default=64, help="serving prompt length (random tokens)")
            p.add_argument("--prompts-per-client", type=int, default=2, help="serving requests per concurrent client")
            p.add_argument("--base-port", type=int, help="ports base..base+3 on 127.0.0.1 (default: free ones)")
            p.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                           help="serving half: measure this running OpenAI server (base URL, no /v1) instead of "
                           "starting the native server and the stack; repeat. Names native, worker and front get "
                           "the ratios; --model names the tokenizer (OPENAI_API_KEY is sent when set)")  # fmt: skip
            p.add_argument("--target-model", action="append", default=[], metavar="NAME=MODEL",
                           help="the model name to ask --target NAME for (default: the first its /v1/models lists)")  # fmt: skip
        if mode == "cpu-defaults":
            p.add_argument("--max-batched-tokens", type=int, nargs="*", default=[],
                           help="also measure ours with these max_num_batched_tokens")  # fmt: skip
            p.add_argument("--prompt-tokens", type=int, default=0, help="pad prompts to about this many tokens")
            p.add_argument("--compare-preload", action="store_true",
                           help="also measure ours with LD_PRELOAD of tcmalloc and Intel OpenMP (QWEN_VLLM_PRELOAD=1)")  # fmt: skip
        if mode == "llamacpp":
            from qwen_vllm.bench.llamacpp import add_arguments as add_llamacpp_arguments

            add_llamacpp_arguments(p)
        if mode == "quant":
            p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement")
            p.add_argument("--bits", type=int, nargs="+", choices=[4, 8], default=[4, 8], help="GPTQ widths to run")
            p.add_argument("--float-dtype", choices=["float32", "bfloat16", "float16"],
                           help="dtype of the float model the GPTQ ones are compared with (default: --dtype; "
                           "float32 is the one to beat on CPUs without native bf16)")  # fmt: skip
        if mode in ("quant", "llamacpp"):
            p.add_argument("--int8-lm-head", action="store_true",
                           help="also run each of our models with its lm_head in int8 rows (CPU; additional_config qwen_int8_lm_head)")  # fmt: skip
            p.add_argument("--int8-embedding", action="store_true",
                           help="with --int8-lm-head: those runs hold the embedding in int8 rows too (qwen_int8_embedding)")  # fmt: skip
        if mode == "lora":
            p.add_argument("--rank", type=int, default=64, help="adapters' LoRA rank (finetune.py's default: 64)")
        if mode == "admission":
            p.add_argument("--max-num-seqs", type=int, default=8, help="the worker's --max-num-seqs (B)")
            p.add_argument("--waves", type=int, default=4, help="the burst is this many times B requests")
        if mode == "chaos":
            p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
            p.add_argument("--duration", type=float, default=300, help="seconds of the chaos phase")
            p.add_argument("--calm-duration", type=float, default=120, help="seconds of the calm phase")
            p.add_argument("--kill-every", type=float, default=60, help="seconds between kills")
            p.add_argument("--max-requests", type=int, default=0, help="end a phase after this many requests (0: no limit)")


def check_args(args: argparse.Namespace) -> None:
    sizes = [args.new_tokens, args.rounds, *getattr(args, "batches", []), getattr(args, "batch", 1)]
    sizes += getattr(args, "concurrency", []) + [getattr(args, "prefill_tokens", 1)]
    if min(sizes) < 1:
        raise ValueError("--new-tokens, --rounds, --prefill-tokens, batch sizes and concurrencies must be at least 1")
    for target in getattr(args, "target", []):
        name, _, url = target.partition("=")
        if not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--target {target!r}: give NAME=URL, e.g. native=http://127.0.0.1:8000")
    named = {t.partition("=")[0] for t in getattr(args, "target", [])}
    for pick in getattr(args, "target_model", []):
        name, _, served = pick.partition("=")
        if name not in named or not served:
            raise ValueError(f"--target-model {pick!r}: give NAME=MODEL for a NAME given with --target")
    if args.mode in ("quant", "llamacpp") and not args.size:
        raise ValueError(f"{args.mode} compares layouts of one shape: give --size (dummy weights)")
    if getattr(args, "int8_embedding", False) and not args.int8_lm_head:
        raise ValueError("--int8-embedding goes with --int8-lm-head: it adds the embedding to those runs")
    if args.mode == "llamacpp" and args.bits and args.dtype not in ("float16", "bfloat16"):
        raise ValueError(f"vLLM runs GPTQ in float16 or bfloat16, not {args.dtype}: give --dtype, or --bits with none")
    if args.mode == "llamacpp":
        from qwen_vllm.bench.llamacpp import (
            AVX2_PYTHON,
            DEFAULT_PYTHON,
            llamacpp_version,
        )

        args.llamacpp_python = args.llamacpp_python or (AVX2_PYTHON if args.cpu_isa else DEFAULT_PYTHON)
        if not args.llamacpp_python.exists():
            setup = "setup-llamacpp-avx2" if args.cpu_isa else "setup-llamacpp"
            raise ValueError(f"{args.llamacpp_python}: no llama.cpp environment; run `make {setup}`")
        if args.cpu_isa and "AVX512" in (build := llamacpp_version(args.llamacpp_python)):
            raise ValueError(f"--cpu-isa {args.cpu_isa}: {args.llamacpp_python} is {build}, which picks its own "
                             "kernels; give --llamacpp-python a llama.cpp built for AVX2 (docs/performance.md)")  # fmt: skip
    if args.mode == "quant" and args.dtype not in ("float16", "bfloat16"):
        raise ValueError(f"vLLM runs GPTQ in float16 or bfloat16, not {args.dtype}: give --dtype")
    if args.new_tokens + 64 > args.seq_length:
        raise ValueError(f"--new-tokens {args.new_tokens} does not fit the model's {args.seq_length}-token context")


def run(args: argparse.Namespace) -> int:
    from qwen_vllm.errors import QwenCheckpointError
    from qwen_vllm.plugin.checkpoint import read_config, validate_checkpoint
    from qwen_vllm.runtime.cpu import cpu_caps, default_float_dtype

    native = cpu_caps().isa
    if args.cpu_isa:  # before the default dtype and every child process
        from qwen_vllm.runtime.cpu import avx2_environment, emulate_isa

        if not cpu_caps().x86:
            print("qwen-vllm bench: error: --cpu-isa avx2 needs an x86 CPU", file=sys.stderr)
            return 2
        os.environ.update(avx2_environment())
        emulate_isa()
    args.dtype = args.dtype or default_float_dtype()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups: no engine left behind
    with tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        if args.size:
            model, label, args.load_format = write_shape_model(args.size, Path(tmp) / f"Qwen-{args.size}-shape"), (
                f"Qwen-{args.size} shape (random weights)"
            ), "dummy"
        else:
            if args.model is None:
                from qwen_vllm.checkpoints.fixtures import make_model

                args.model = make_model(Path(tmp) / "tiny-random", "random")
            model, label, args.load_format = args.model.resolve(), args.model.name, "auto"
            try:
                validate_checkpoint(model)
            except QwenCheckpointError as exc:
                print(f"qwen-vllm bench: error: {exc}", file=sys.stderr)
                return 2
        args.seq_length = read_config(model)["seq_length"]
        try:
            check_args(args)
        except ValueError as exc:
            print(f"qwen-vllm bench: error: {exc}", file=sys.stderr)
            return 2
        started = time.time()
        data = MODES[args.mode](args, model)
    result = {
        "mode": args.mode,
        "model_label": label,
        "model": str(args.model) if args.model else None,
        "size": args.size,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        **({"compiled": True} if args.compiled else {}),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "wall_s": time.time() - started,
        "machine": machine() + (f", emulated on {native}" if native != cpu_caps().isa else ""),
        "command": "qwen-vllm bench " + " ".join(sys.argv[sys.argv.index(args.mode) :] if args.mode in sys.argv else [args.mode]),
        "data": data,
    }
    paths = write_results(result, args.out)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("bench")
