"""``qwen-vllm bench llamacpp``: our servers against llama.cpp's on one Qwen size.

CPU users of Qwen often pick llama.cpp, so this puts the two side by side:
the same random prompts through ``vllm.benchmarks.serve`` (streaming
/v1/completions, fixed output length) at each concurrency, one server at a
time, all in one run:

* ours: vLLM's OpenAI server with our plugin on the ``--size`` shape in the
  float dtype and as GPTQ Int4 (dummy weights, as ``bench quant``);
* llama.cpp: llama-cpp-python's OpenAI server (``make setup-llamacpp``: a
  separate environment built by pip) on GGUF files of the same shape: F16
  written here with gguf-py (llama.cpp's own Python package) in the Qwen2
  layout our conversion writes (plugin/weights.py names every tensor), then
  Q8_0 and Q4_0 by llama.cpp's own quantizer. Random weights: speed does not
  depend on their values.

llama-cpp-python's server runs one request at a time, so its throughput at
concurrency 8 is its batch-1 speed; that is the server this comparison is about.
Three of its settings are changed: requests wait for the running one instead
of interrupting it (``--interrupt_requests False``: by default a new request
cuts the stream in flight short); no SSE pings while a request waits
(``--disable_ping_events True``: vLLM's load generator strips each network
chunk, so a ping comment glues onto the data after it and the whole stream is
lost); and its request-id check (UUIDs only) is off: vLLM's load generator
sends ids of its own, which it would refuse with 400.

The llama.cpp half runs in the llama.cpp environment (no torch, no vLLM):
``python -m qwen_vllm.bench.llamacpp gguf SPEC_JSON`` writes the files the spec
names; ``python -m qwen_vllm.bench.llamacpp serve ARGS`` is llama-cpp-python's
server with ARGS.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# llama.cpp file types (llama.h LLAMA_FTYPE_MOSTLY_*) and their GGUF file names.
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2}
# Which of our models each llama.cpp file is compared with.
PAIRS = {"F16": "float", "Q8_0": "int8", "Q4_0": "int4"}
DEFAULT_PYTHON = Path(".venv-llamacpp/bin/python")  # make setup-llamacpp
AVX2_PYTHON = Path(".venv-llamacpp-avx2/bin/python")  # make setup-llamacpp-avx2: for --cpu-isa avx2
PAD_TOKEN = "[PAD{}]"  # rows of the embedding beyond the tokenizer, as llama.cpp's converter names them


# -- the GGUF half (llama.cpp environment) -----------------------------------------
def qwen2_tensors(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(Qwen2 name, shape) of every tensor a Qwen v1 checkpoint with config.json
    ``cfg`` has once converted; c_attn splits in three (q, k, v)."""
    from qwen_vllm.plugin.weights import MODEL_TENSORS, expected_shapes, qwen2_names

    shapes = expected_shapes(cfg)
    names = [n for n in MODEL_TENSORS if n in shapes]
    names += [f"transformer.h.{b}.{local}" for b in range(cfg["num_hidden_layers"]) for local in shapes if local not in MODEL_TENSORS]
    for name in names:
        local = name if name in MODEL_TENSORS else name.split(".", 3)[3]
        shape = shapes[local]
        parts = qwen2_names(name)
        for part in parts:
            yield part, (shape[0] // len(parts), *shape[1:])


def write_gguf(spec: dict[str, Any]) -> None:
    """F16 GGUF of random weights with the spec's config and tokenizer, then
    each quantized type the spec asks for, by llama.cpp's quantizer."""
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    cfg, out = spec["config"], Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "F16.gguf"
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    writer = gguf.GGUFWriter(str(f16), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_name(spec["name"])
    writer.add_context_length(cfg["seq_length"])
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(cfg["intermediate_size"] // 2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)  # Qwen v1: one K/V head per head
    writer.add_rope_freq_base(float(cfg.get("rotary_emb_base", 10000)))
    writer.add_layer_norm_rms_eps(cfg["layer_norm_epsilon"])
    writer.add_file_type(FILE_TYPES["F16"])
    vocab = gguf.vocab.BpeVocab(Path(spec["tokenizer_dir"]))
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8"))
        types.append(kind)
    for i in range(len(tokens), cfg["vocab_size"]):
        tokens.append(PAD_TOKEN.format(i))
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # Qwen v1 and Qwen2 share the tokenizer's split pattern
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, eos (<|im_end|>) and pad from the tokenizer's files; Qwen has no BOS:
    # llama.cpp gets <|endoftext|> as one, never added.
    gguf.SpecialVocab(Path(spec["tokenizer_dir"]), load_merges=True).add_to_gguf(writer)
    writer.add_bos_token_id(spec["bos_id"])
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    rng = np.random.default_rng(0)
    for name, shape in qwen2_tensors(cfg):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"gguf-py has no QWEN2 name for {name}")
        if name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)  # llama.cpp keeps 1-D tensors in F32
        elif len(shape) == 1:
            data = np.zeros(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    print(f"[bench] wrote {f16} ({f16.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr, flush=True)
    for kind in spec["quantize"]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[kind]
        params.nthread = len(os.sched_getaffinity(0))
        target = out / f"{kind}.gguf"
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(target).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind}")
        print(f"[bench] wrote {target} ({target.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr, flush=True)


def serve(argv: list[str]) -> None:
    """llama-cpp-python's server (its own ``__main__``), accepting any request id."""
    import functools

    import starlette_context.plugins as plugins

    plugins.RequestIdPlugin = functools.partial(plugins.RequestIdPlugin, validate=False)  # before the app imports it
    from llama_cpp.server.__main__ import main

    sys.argv = ["llama_cpp.server", *argv]
    main()


# -- the bench half (our environment) ------------------------------------------------
def gguf_files(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Path]:
    """Write the GGUF files (F16 and the asked-for quantized ones) for ``model``'s shape."""
    from qwen_vllm.bench.engine import child_env, say
    from qwen_vllm.chat_template import CHATML_JINJA
    from qwen_vllm.checkpoints.convert import write_fast_tokenizer
    from qwen_vllm.plugin.checkpoint import VOCAB_FILE, read_config
    from qwen_vllm.stop_words import ENDOFTEXT_ID

    cfg = read_config(model)
    tokenizer = work / "qwen2-tokenizer"
    write_fast_tokenizer(model / VOCAB_FILE, tokenizer, CHATML_JINJA, cfg["seq_length"])
    kinds = [k for k in FILE_TYPES if k in args.llamacpp_files]
    spec = {"config": cfg, "name": model.name, "tokenizer_dir": str(tokenizer), "out_dir": str(work / "gguf"),
            "bos_id": ENDOFTEXT_ID, "quantize": [k for k in kinds if k != "F16"]}  # fmt: skip
    say(f"writing GGUF files {', '.join(kinds)} with {args.llamacpp_python} ...")
    subprocess.run([str(args.llamacpp_python), "-m", "qwen_vllm.bench.llamacpp", "gguf", json.dumps(spec)], env=child_env(), check=True)
    return {k: work / "gguf" / f"{k}.gguf" for k in kinds}


@contextlib.contextmanager
def llamacpp_server(python: Path, gguf: Path, name: str, port: int, ctx: int, log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """llama-cpp-python's OpenAI server on ``gguf``: (base URL, process) once it answers."""
    from qwen_vllm.bench.engine import child_env
    from qwen_vllm.bench.serving import stop_group, wait_http

    threads = str(len(os.sched_getaffinity(0)))
    proc = subprocess.Popen(
        [str(python), "-m", "qwen_vllm.bench.llamacpp", "serve", "--model", str(gguf), "--model_alias", name,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx), "--n_threads", threads,
         "--n_threads_batch", threads, "--interrupt_requests", "False", "--disable_ping_events", "True"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=child_env(),
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 600, f"llama.cpp server (log {log})")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_group(proc)


def llamacpp(args: argparse.Namespace, model: Path) -> dict:
    """Tokens/s at each concurrency: ours (float, Int4, Int8 as asked) and
    llama.cpp (F16, Q8_0, Q4_0 as asked), one server at a time."""
    import tempfile

    import qwen_vllm
    from qwen_vllm.bench.engine import say
    from qwen_vllm.bench.serving import (
        measure,
        median_rows,
        native_args,
        native_env,
        native_server,
    )
    from qwen_vllm.bench.shapes import lm_head_variants, write_shape_model
    from qwen_vllm.runtime.ports import free_ports

    qwen_vllm.register()  # the benchmark client loads the model's QWenTokenizer
    spec = {"new_tokens": args.new_tokens, "concurrency": args.concurrency, "input_len": args.input_len,
            "prompts_per_client": args.prompts_per_client, "rounds": args.rounds}  # fmt: skip
    ctx = args.input_len + args.new_tokens + 64
    ours = {"float": None, **{f"int{b}": b for b in args.bits}}
    variants = lm_head_variants(args.int8_lm_head, args.int8_embedding)
    env = native_env()
    runs: dict[tuple[str, int], list[dict]] = {}
    port = free_ports(1)
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        work = Path(tmp)
        for name, bits in ours.items():
            shape = model if bits is None else write_shape_model(args.size, work / f"int{bits}", gptq_bits=bits)
            for suffix, config in variants:
                target = name + suffix
                say(f"{target}: vLLM server ...")
                engine = native_args(args.dtype, "dummy", ctx, args.compiled)
                engine += ["--additional-config", json.dumps(config)] if config else []
                with native_server(shape, model.name, port, engine, env, work / f"{target}.log") as bases:
                    runs |= measure({target: bases["native"]}, model, {target: model.name}, spec)
        failed: dict[str, str] = {}
        args.out.mkdir(parents=True, exist_ok=True)
        for kind, path in gguf_files(args, model, work).items():
            target = f"llama.cpp {kind}"
            say(f"{target}: llama-cpp-python server ...")
            log = args.out / f"llamacpp-{kind}.log"  # kept: the server's own account of a failure
            with llamacpp_server(args.llamacpp_python, path, kind, port, ctx, log) as (base, proc):
                for c in args.concurrency:  # one at a time: what was measured before a failure is kept
                    try:
                        runs |= measure({target: base}, model, {target: kind}, {**spec, "concurrency": [c]})
                    except RuntimeError as exc:
                        code = proc.poll()
                        how = "the server stayed up" if code is None else f"the server died (exit status {code})"
                        failed[f"{target} concurrency {c}"] = why = f"{exc}; {how}; log {log}"
                        say(f"{target} failed: {why}")
                        break
            path.unlink()  # the F16 file alone is as large as the float weights
    rows = median_rows(runs, spec)
    tok = {(r["target"], r["concurrency"]): r["tok_s"] for r in rows}
    ratios, goals = {}, {}
    for kind, mine in PAIRS.items():
        for c in args.concurrency:
            for target in (mine + suffix for suffix, _ in variants):
                if (target, c) in tok and (f"llama.cpp {kind}", c) in tok:
                    ratios[f"{target} / llama.cpp {kind} concurrency {c}"] = tok[target, c] / tok[f"llama.cpp {kind}", c]
    if "int4 / llama.cpp Q4_0 concurrency 1" in ratios:
        goals["Int4 vs Q4_0 at batch 1 >= 1x"] = ratios["int4 / llama.cpp Q4_0 concurrency 1"] >= 1
    top = max(args.concurrency)
    if top >= 8 and f"int4 / llama.cpp Q4_0 concurrency {top}" in ratios:
        goals[f"Int4 vs Q4_0 at concurrency {top} >= 2x"] = ratios[f"int4 / llama.cpp Q4_0 concurrency {top}"] >= 2
    return {"rows": rows, "ratios": ratios, "goals": goals, "failed": failed, "llamacpp": llamacpp_version(args.llamacpp_python)}


# The instruction sets llama.cpp's system info names that tell the CPU kinds apart.
LLAMACPP_ISA = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8")


@functools.cache  # asked by the argument check (--cpu-isa) and the report: one subprocess
def llamacpp_version(python: Path) -> str:
    """"llama-cpp-python VERSION (the instruction sets of its CPU build)"."""
    code = "import llama_cpp; print(llama_cpp.__version__); print(llama_cpp.llama_print_system_info().decode())"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.splitlines()
    isa = [k for k in LLAMACPP_ISA if f"| {k} = 1 |" in f"| {out[1] if len(out) > 1 else ''}"]
    return f"llama-cpp-python {out[0].strip() if out else '?'} ({', '.join(isa) or 'no AVX2'})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=64, help="prompt length (random tokens)")
    p.add_argument("--prompts-per-client", type=int, default=2, help="requests per concurrent client")
    p.add_argument("--bits", type=int, nargs="*", choices=[4, 8], default=[4], help="our GPTQ widths (none: float only)")
    p.add_argument("--llamacpp-files", nargs="+", choices=list(FILE_TYPES), default=["F16", "Q4_0"],
                   help="GGUF types to serve with llama.cpp")  # fmt: skip
    p.add_argument("--llamacpp-python", type=Path,
                   help=f"python of the llama.cpp environment (default {DEFAULT_PYTHON}, made by make setup-llamacpp; "
                   f"with --cpu-isa avx2 {AVX2_PYTHON}, made by make setup-llamacpp-avx2)")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["gguf"]:
        write_gguf(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
    else:
        sys.exit("usage: python -m qwen_vllm.bench.llamacpp gguf SPEC_JSON | serve LLAMA_CPP_SERVER_ARGS")
