"""One ``qwen-vllm bench`` measurement job, run in its own process.

Each engine (vLLM or transformers) gets a fresh process so its memory is
returned to the machine afterwards, its peak memory is its own, and the CPU
thread binding of the environment it was started with is the one measured.
The parent (``qwen_vllm.bench.report``) sends a JSON job spec as the only argument
and reads one ``BENCH_RESULT {json}`` line back; progress goes to stderr.

Work is the README's method: a chat prompt per sequence, exactly ``new_tokens``
generated (greedy, stops suppressed) for a batch of sequences at once;
tokens/s = batch x new_tokens / wall time. Targets:
  ``raw``      vllm.LLM.generate on the ChatML token ids (no wrapper),
  ``wrapper``  vLLMWrapper.batch_chat on the same queries (same ids, same tokens),
  ``transformers``  Qwen2ForCausalLM.generate on the converted Qwen2 copy,
                    left-padded static batch (what users run without vLLM),
  ``lora-K``   vLLMWrapper.batch_chat with K distinct LoRA adapters over the
               batch, round robin (``lora-0``: no adapter, on a LoRA engine).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_vllm.runtime.processes import tree_resident_bytes

RESULT_PREFIX = "BENCH_RESULT "


def emit_result(result: dict) -> None:
    """The job's side of the protocol: hand ``result`` to the parent
    (``qwen_vllm.bench.report.run_python``) on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
PAD_ID = 151643  # <|endoftext|>, Qwen's pad id


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: dict) -> None:
    """Write a benchmark's results (creating its folder), indented for diffs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_report(result: dict, out: str | Path) -> int:
    """A benchmark script's last step: its JSON written and named; exit code 0."""
    write_json(Path(out), result)
    print(f"\nwrote {out}")
    return 0


class PeakMemory:
    """Samples the resident memory of this process and its children (vLLM's
    engine core is a child process) while the job runs."""

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self.peak_bytes = 0
        self.window_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = tree_resident_bytes()
            self.peak_bytes = max(self.peak_bytes, now)
            self.window_bytes = max(self.window_bytes, now)

    def window(self) -> int:
        """Peak since the previous call (and now), then start a new window."""
        peak, self.window_bytes = max(self.window_bytes, tree_resident_bytes()), 0
        return peak

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_resident_bytes())


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a bench child process (an engine job, or the
    llama.cpp half, whose environment has no qwen_vllm installed): this
    repository on PYTHONPATH, vLLM logging at WARNING unless set, ``extra``."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the [bench] progress lines readable
    env.update(extra or {})
    return env


def weight_counts(model_dir: str | os.PathLike) -> tuple[int, int]:
    """(parameters of all transformer layers, of one vocab x hidden matrix) of a
    Qwen v1 checkpoint, from its config."""
    from qwen_vllm.plugin.checkpoint import read_config

    cfg = read_config(model_dir)
    h, mlp, layers = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["num_hidden_layers"]
    return layers * (4 * h * h + 3 * h + 3 * h * mlp + 2 * h), cfg["vocab_size"] * h


def model_gib(model_dir: str, dtype: str) -> float:
    """Weight memory of a Qwen v1 checkpoint (embedding, lm_head, layers)."""
    layers, vocab = weight_counts(model_dir)
    return (layers + 2 * vocab) * (4 if dtype == "float32" else 2) / 2**30


def wait_for_memory(need_gib: float, what: str, timeout_s: float = 1800) -> None:
    """Start an engine only when the machine has the memory for it: on a shared
    host an engine that does not fit gets OOM-killed, or gets someone else killed."""
    import psutil

    start = last = time.monotonic()
    while (free := psutil.virtual_memory().available / 2**30) < need_gib:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{what} needs ~{need_gib:.1f} GiB; only {free:.1f} GiB free after {timeout_s:.0f} s")
        if time.monotonic() - last >= 30 or last == start:
            last = time.monotonic()
            say(f"{what} needs ~{need_gib:.1f} GiB, {free:.1f} GiB free: waiting ({last - start:.0f} s)")
        time.sleep(5)


def queries(count: int, pad_tokens: int = 0) -> list[str]:
    """Distinct chat questions; ``pad_tokens`` lengthens each by about that many tokens."""
    pad = " word" * pad_tokens
    return [f"Question {i}: please write a long story about the number {i}.{pad}" for i in range(count)]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(targets: dict[str, Callable[[int], Any]], spec: dict) -> list[dict]:
    """Run every target at every batch size, rounds interleaved (so machine noise
    hits all targets alike); one warm-up call per target first. tokens/s counts
    ``new_tokens`` per sequence, or the target's ``tokens_per_sequence`` entry
    (prefill: the prompt tokens)."""
    n, rounds = spec["new_tokens"], spec["rounds"]
    counts = {name: spec.get("tokens_per_sequence", {}).get(name, n) for name in targets}
    for name, fn in targets.items():
        say(f"warm-up {name}")
        fn(1)
    times: dict[tuple[str, int], list[float]] = {(t, b): [] for t in targets for b in spec["batches"]}
    peaks: dict[tuple[str, int], int] = dict.fromkeys(times, 0)
    for r in range(rounds):
        for batch in spec["batches"]:
            order = list(targets)[r % len(targets) :] + list(targets)[: r % len(targets)]
            for name in order:
                MEMORY.window()
                seconds = timed(lambda: targets[name](batch))
                times[name, batch].append(seconds)
                peaks[name, batch] = max(peaks[name, batch], MEMORY.window())
                say(f"round {r + 1}/{rounds} batch {batch} {name}: {batch * counts[name] / seconds:.2f} tok/s")
    return [
        {
            "target": name,
            "batch": batch,
            "new_tokens": n,
            "tok_s": batch * counts[name] / statistics.median(runs),
            "runs_s": runs,
            "peak_rss_gib": peaks[name, batch] / 2**30,
        }
        for (name, batch), runs in times.items()
    ]


def eager(compiled: bool) -> bool:
    """Whether a bench engine runs eager: GPUs measure what they serve with
    (compiled, CUDA graphs); CPUs run eager unless ``--compiled`` (compiling
    about doubles a CPU engine's start-up)."""
    from qwen_vllm.runtime.cpu import on_cpu

    return on_cpu() and not compiled


def vllm_job(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qwen_vllm.chat_template import make_context
    from qwen_vllm.plugin.model import resident_model_gib
    from qwen_vllm.runtime.cpu import apply_cpu_defaults
    from qwen_vllm.stop_words import CHATML_STOP_IDS
    from qwen_vllm.wrapper.chat import vLLMWrapper

    n = spec["new_tokens"]
    tp = spec.get("engine", {}).get("tensor_parallel_size", 1)
    # The binding the wrapper starts the engine with (runtime/cpu.engine_environment).
    bind = "VLLM_CPU_OMP_THREADS_BIND"
    binding = apply_cpu_defaults(tp, dict(os.environ)).get(bind) or os.environ.get(bind, "auto")
    # vLLM hands a function to its workers (LLM.apply_model, for the model's
    # memory below) only when allowed to pickle it: this job's engines only.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    say(f"starting the vLLM engine ({spec['model']}, load_format={spec['load_format']}) ...")
    start = time.perf_counter()
    wrapper = vLLMWrapper(
        spec["model"],
        dtype=spec["dtype"],
        enforce_eager=eager(spec.get("compiled", False)),
        load_format=spec["load_format"],
        **spec.get("engine", {}),
    )
    load_s = time.perf_counter() - start
    say(f"engine ready in {load_s:.0f} s")
    qs = queries(max(spec["batches"]), spec.get("prompt_tokens", 0))
    ids = [make_context(wrapper.tokenizer, q, [])[0] for q in qs]
    gen = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0)
    raw_params = SamplingParams(
        temperature=0, max_tokens=n, min_tokens=n, stop_token_ids=list(CHATML_STOP_IDS), repetition_penalty=1.0
    )
    available = {
        "raw": lambda b: wrapper.llm.generate(
            [TokensPrompt(prompt_token_ids=i) for i in ids[:b]], raw_params, use_tqdm=False
        ),
        "wrapper": lambda b: wrapper.batch_chat(qs[:b], **gen),
    }
    if "prefill_tokens" in spec:  # fresh random prompts every call: nothing for prefix caching to reuse
        rng = random.Random(0)
        prefill_params = SamplingParams(temperature=0, max_tokens=1)

        def prefill(b: int) -> Any:
            prompts = [[rng.randrange(100, 150000) for _ in range(spec["prefill_tokens"])] for _ in range(b)]
            return wrapper.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], prefill_params, use_tqdm=False)

        available["prefill"] = prefill
    adapters = [wrapper.load_adapter(path) for path in spec.get("adapters", [])]
    for k in (0, 1, len(adapters)) if adapters else ():
        available[f"lora-{k}"] = lambda b, k=k: wrapper.batch_chat(
            qs[:b], adapter=[adapters[i % k] if k else None for i in range(b)], **gen
        )
    rows = measure({t: available[t] for t in spec["targets"]}, spec)
    cache = wrapper.llm.llm_engine.vllm_config.cache_config
    return {
        "rows": rows,
        "load_s": load_s,
        "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "max_num_batched_tokens": wrapper.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
        "omp_threads_bind": binding,
        "ld_preload": engine_libraries(),
        "vllm_kernels": engine_libraries(("_C",), folder="vllm"),  # _C, _C_AVX512 or _C_AVX2: by CPU kind
        "model_gib": sum(wrapper.llm.apply_model(resident_model_gib)),  # all tensor-parallel ranks
        "prompt_tokens": statistics.median(len(i) for i in ids),
    }


# The allocator and OpenMP runtimes LD_PRELOAD chooses between (runtime/cpu.py).
RUNTIME_LIBRARIES = ("libtcmalloc", "libjemalloc", "libiomp", "libgomp")


def engine_libraries(prefixes: tuple[str, ...] = RUNTIME_LIBRARIES, folder: str | None = None) -> str:
    """The libraries vLLM's engine-core process has loaded whose file names
    start with ``prefixes`` (in ``folder`` if given), in load order: by default
    the allocator and OpenMP ones, what LD_PRELOAD decided (its environment
    cannot be read back: vLLM retitles the process over it)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()):
                paths = (Path(m.path) for m in child.memory_maps(grouped=False))
                names = (p.name for p in paths if folder is None or p.parent.name == folder)
                return " ".join(dict.fromkeys(n for n in names if n.startswith(prefixes)))
        except psutil.Error:
            continue
    return ""


def transformers_model(model_dir: str, load_format: str, dtype: Any) -> Any:
    """Qwen2ForCausalLM for the Qwen v1 ``model_dir``: the converted copy of its
    weights, or (dummy) the same shapes with transformers' random init."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_vllm.checkpoints.convert import convert_to_qwen2, qwen2_config
    from qwen_vllm.plugin.checkpoint import read_config

    if load_format == "dummy":
        cfg = Qwen2Config(**{k: v for k, v in qwen2_config(read_config(model_dir)).items() if k != "torch_dtype"})
        return Qwen2ForCausalLM(cfg).to(dtype)
    with tempfile.TemporaryDirectory(prefix="bench-qwen2-") as tmp:
        qwen2 = convert_to_qwen2(model_dir, Path(tmp) / "qwen2")
        return Qwen2ForCausalLM.from_pretrained(str(qwen2), dtype=dtype)


def transformers_generate(model: Any, contexts: list[list[int]], new_tokens: int) -> None:
    """The README's transformers path as a static batch: left-padded with
    Qwen's pad id, greedy, exactly ``new_tokens`` new tokens per row."""
    import torch

    width = max(len(c) for c in contexts)
    input_ids = torch.tensor([[PAD_ID] * (width - len(c)) + c for c in contexts])
    mask = (input_ids != PAD_ID).long()  # ChatML contexts never contain <|endoftext|>
    with torch.no_grad():
        model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            repetition_penalty=1.0,
            pad_token_id=PAD_ID,
        )


def transformers_job(spec: dict) -> dict:
    import torch

    from qwen_vllm.chat_template import make_context
    from qwen_vllm.plugin.checkpoint import VOCAB_FILE
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

    n = spec["new_tokens"]
    say(f"loading transformers Qwen2ForCausalLM ({spec['model']}, load_format={spec['load_format']}) ...")
    start = time.perf_counter()
    model = transformers_model(spec["model"], spec["load_format"], getattr(torch, spec["dtype"])).eval()
    load_s = time.perf_counter() - start
    say(f"model ready in {load_s:.0f} s")
    tok = QWenTokenizer(str(Path(spec["model"]) / VOCAB_FILE))
    contexts = [make_context(tok, q, [])[0] for q in queries(max(spec["batches"]), spec.get("prompt_tokens", 0))]

    def generate(batch: int) -> None:
        transformers_generate(model, contexts[:batch], n)

    return {
        "rows": measure({"transformers": generate}, spec),
        "load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": statistics.median(len(c) for c in contexts),
    }


JOBS = {"vllm": vllm_job, "transformers": transformers_job}
MEMORY = PeakMemory()  # host memory of this job's process tree (the engine core included)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    with MEMORY:
        result = JOBS[spec["kind"]](spec)
    result["peak_rss_gib"] = MEMORY.peak_bytes / 2**30
    emit_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
