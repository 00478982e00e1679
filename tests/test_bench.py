"""``qwen-vllm bench``: every mode really runs (real engines, real servers) on
the tiny random fixture with a few tokens, and writes a well-formed markdown
table, JSON and PNG. Figures are never asserted (the machine is shared); only
that they exist, are positive and the ratios finite.

Two tiny live runs, side by side at module set-up: ``profile`` (one engine:
the engine job every offline mode runs, in its own process; with ``--cpu-isa
avx2`` on x86, so AVX-512 machines run an engine on vLLM's AVX2 library too) and ``versus``'s
serving half, with ``--target``: the session's vLLM server vs the shared
FastChat topology's worker and front, so it starts no engine. ``cpu-defaults``
runs that same engine job once per variant (two engines): its variants are
checked without an engine. The full reports are checked on JSON recorded by a
whole run (tests/data/bench, an AVX-512 + AMX machine): their structure, and
that the markdown renders exactly as recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from reliability_stack import topology  # noqa: F401 (a fixture: versus measures its worker and front)

from qwen_vllm.runtime.cpu import cpu_caps, default_float_dtype

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 4
COMMON = ["--new-tokens", str(NEW_TOKENS), "--rounds", "1"]
RUNS = {
    "versus": ["--only", "serving", "--concurrency", "1", "8", "--prompts-per-client", "1", "--input-len", "16"],
    "profile": ["--batch", "4", *(["--cpu-isa", "avx2"] if cpu_caps().x86 else [])],
}  # fmt: skip
USES_TOPOLOGY = True  # live runs reach bench_runs through getfixturevalue (reliability_stack)
pytestmark = pytest.mark.timeout(1800)  # an engine start: slow when the machine is shared
RECORDED = Path(__file__).resolve().parent / "data" / "bench"
TIMEOUT_S = 1500  # per run; ~3-5 min on a quiet 2-core machine, far more when it is shared


def bench_cmd(mode: str, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qwen_vllm.cli", "bench", mode, "--model", str(model), "--out", str(out),
            *COMMON, *RUNS[mode], *extra]  # fmt: skip


@pytest.fixture(scope="module")
def bench_runs(
    random_model: Path, scripted_model: Path, openai_server: str, topology, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """mode -> (results folder, log); every run must have exited 0."""
    targets = {"native": openai_server, "worker": topology.worker_url("a"), "front": topology.front_url}
    picks = [f"--target-model={k}=scripted" for k in ("worker", "front")]  # the base model, not a LoRA adapter
    extra = {"versus": [*(f"--target={k}={v}" for k, v in targets.items()), *picks]}
    opt_in = {"profile": {"QWEN_VLLM_PRELOAD": "1"}}  # runtime/cpu.py PRELOAD_ENV: tcmalloc + Intel OpenMP
    models = {"versus": scripted_model}  # what the targets serve
    root = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    outs = {mode: (root / mode, root / f"{mode}.log") for mode in RUNS}
    codes: dict[str, int] = {}

    def one(mode: str) -> None:
        from qwen_vllm.bench.serving import stop_group

        out, log = outs[mode]
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                bench_cmd(mode, models.get(mode, random_model), out, *extra.get(mode, [])), env={**env, **opt_in.get(mode, {})},
                stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                codes[mode] = proc.wait(timeout=TIMEOUT_S)
            finally:
                stop_group(proc)  # a run that hangs leaves no engine behind

    threads = [threading.Thread(target=one, args=(mode,)) for mode in RUNS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for mode, (_, log) in outs.items():
        assert codes.get(mode) == 0, f"bench {mode} failed:\n{log.read_text()[-4000:]}"
    return outs


def load(bench_runs: dict, mode: str) -> dict:
    out, _ = bench_runs[mode]
    md, png = (out / f"{mode}.md").read_text(), (out / f"{mode}.png").read_bytes()
    assert md.startswith(f"## qwen-vllm bench {mode}:") and "|---|" in md
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    result = json.loads((out / f"{mode}.json").read_text())
    dtype = "float32" if "--cpu-isa" in RUNS.get(mode, []) else default_float_dtype()  # auto as on AVX2
    assert result["mode"] == mode and result["new_tokens"] == NEW_TOKENS and result["dtype"] == dtype
    return result


def check_ratios(data: dict) -> None:
    assert data["ratios"]
    for name, value in data["ratios"].items():
        assert math.isfinite(value) and value > 0, name


def result_of(request: pytest.FixtureRequest, mode: str, source: str) -> dict:
    """The live run's result (starting the runs if needed) or the recorded one."""
    return load(request.getfixturevalue("bench_runs"), mode) if source == "live" else recorded(mode)


@pytest.mark.parametrize("source", ["live", "recorded"])
def test_profile(request: pytest.FixtureRequest, source: str) -> None:
    result = result_of(request, "profile", source)
    data = result["data"]
    rows = data["rows"]
    if source == "live":  # run with QWEN_VLLM_PRELOAD=1: the engine processes start with what is installed
        from qwen_vllm.runtime.cpu import preload_value

        wanted = [Path(p).resolve().name for p in (preload_value("") or "").split(":") if p]
        loaded = data["engine"]["ld_preload"].split()  # the files the engine process has mapped
        assert set(wanted) <= set(loaded) if wanted else any(n.startswith("libgomp") for n in loaded), loaded
        # our thread binding reached the engine: every core this process may use
        assert data["engine"]["omp_threads_bind"] == ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        if "--cpu-isa" in RUNS["profile"]:  # as an AVX2-only CPU: vLLM loaded its AVX2 library
            machine = result["machine"]
            assert data["engine"]["vllm_kernels"] == "_C_AVX2.abi3.so", data["engine"]["vllm_kernels"]
            assert machine.startswith("x86_64 AVX2 only") and ("emulated on" in machine) == cpu_caps().avx512
    assert sorted(r["batch"] for r in rows) == [1, 4]
    for r in rows:
        assert r["target"] == "wrapper" and r["new_tokens"] == NEW_TOKENS
        assert r["tok_s"] > 0 and r["peak_rss_gib"] > 0.1  # the engine core's memory is counted


def recorded(mode: str) -> dict:
    return json.loads((RECORDED / f"{mode}.json").read_text())


@pytest.mark.parametrize("mode", ["versus", "profile", "cpu-defaults", "lora", "quant", "quant-int8-lm-head", "quant-compiled", "quant-memory", "quant-7b-memory", "quant-avx2", "quant-avx2-memory", "llamacpp", "llamacpp-avx2"])
def test_recorded_reports_render_as_recorded(mode: str, tmp_path: Path) -> None:
    from qwen_vllm.bench.report import markdown, plot

    result = recorded(mode)
    assert markdown(result) + "\n" == (RECORDED / f"{mode}.md").read_text()
    plot(result, tmp_path / "plot.png")
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.mark.parametrize("mode", ["admission", "chaos"])
def test_stress_reports_render_as_recorded(mode: str, tmp_path: Path) -> None:
    """These runs take minutes and restart engines: checked on their recorded
    JSON. No plot (they have no tokens/s rows)."""
    from qwen_vllm.bench.report import markdown, plot

    result = recorded(mode)
    assert markdown(result) + "\n" == (RECORDED / f"{mode}.md").read_text()
    assert plot(result, tmp_path / "plot.png") is False and not (tmp_path / "plot.png").exists()


def test_lora_report() -> None:
    """The recorded Qwen-1.8B-shape run: every target at every batch, ratios
    and the per-slot memory computed from the rows and peaks they cite."""
    data = recorded("lora")["data"]
    n = data["adapters"]
    targets = ["merged", "lora-0", "lora-1", f"lora-{n}"]
    batches = sorted({r["batch"] for r in data["rows"]})
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
    assert sorted(tok) == sorted((t, b) for t in targets for b in batches)
    for t in targets[1:]:
        for b in batches:
            assert data["ratios"][f"{t}/merged batch {b}"] == pytest.approx(tok[t, b] / tok["merged", b])
    mem = data["memory_gib"]
    assert mem["per adapter slot"] == pytest.approx(mem["LoRA engine over plain"] / n)
    assert 0 < mem["one adapter's file"] < mem["plain engine peak"]


def test_quant_report() -> None:
    """The recorded Qwen-1.8B-shape run: float, Int4 and Int8 at every batch
    size, ratios and goals computed from the rows and peaks they cite, and the
    kernel each ran named for the machine's CPU kind."""
    result = recorded("quant")
    data = result["data"]
    batches = sorted({r["batch"] for r in data["rows"]})
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
    assert sorted(tok) == sorted((t, b) for t in ("float", "int4", "int8") for b in batches) and 1 in batches
    for bits in (4, 8):
        for b in batches:
            assert data["ratios"][f"int{bits}/float batch {b}"] == pytest.approx(tok[f"int{bits}", b] / tok["float", b])
        peak = data["ratios"][f"int{bits}/float peak memory"]
        assert peak == pytest.approx(data["memory_gib"][f"int{bits}"] / data["memory_gib"]["float"]) and peak > 0
    assert data["ratios"]["int4/float peak memory"] < 1  # Int8 is dequantized at load on CPU: no saving
    pre = {(r["target"], r["batch"]): r["tok_s"] for r in data["prefill"]}
    assert sorted(pre) == sorted(tok) and all(r["prompt_tokens"] == 512 for r in data["prefill"])
    for b in batches:
        assert data["ratios"][f"int4/float prefill batch {b}"] == pytest.approx(pre["int4", b] / pre["float", b])
    assert data["goals"]["Int4 prefill at batch 1 >= 0.8x float"] == (data["ratios"]["int4/float prefill batch 1"] >= 0.8)
    assert data["goals"]["Int4 decode at batch 1 >= 2x float"] == (data["ratios"]["int4/float batch 1"] >= 2)
    assert data["kernels"]["int8"].startswith("qwen-vllm") and result["size"] == "1.8B"
    assert 1 < data["read_gib_s"] < 1000
    for name, roof in data["roofline"].items():
        assert roof["tok_s"] == pytest.approx(data["read_gib_s"] / roof["gib_per_step"])
        assert roof["achieved"] == pytest.approx(tok[name, 1] / roof["tok_s"])
    assert data["roofline"]["int4"]["gib_per_step"] < 0.5 * data["roofline"]["float"]["gib_per_step"]


@pytest.mark.parametrize("run", ["quant-int8-lm-head", "quant-compiled"])
def test_quant_int8_lm_head_report(run: str) -> None:
    """The recorded ``quant --bits 4 --int8-lm-head`` runs (eager and
    ``--compiled``): each model again with its lm_head in int8 rows, the same
    kernel for its layers, a decode step that reads the lm_head's bytes once
    instead of twice, ratios and goals of its own."""
    from qwen_vllm.bench.shapes import SIZES

    result = recorded(run)
    assert result.get("compiled", False) == (run == "quant-compiled") == ("--compiled" in result["command"])
    data = result["data"]
    names = ["float", "float + int8 lm_head", "int4", "int4 + int8 lm_head"]
    assert list(data["kernels"]) == names and data["kernels"]["int4 + int8 lm_head"] == data["kernels"]["int4"]
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
    for name in names[1:]:
        for b in (1, 8):
            assert data["ratios"][f"{name}/float batch {b}"] == pytest.approx(tok[name, b] / tok["float", b])
    shape = SIZES["1.8B"]
    head_gib = shape["vocab"] * shape["hidden"] / 2**30  # bf16 (2 bytes) -> int8 (1 byte)
    for plain in ("float", "int4"):
        saved = data["roofline"][plain]["gib_per_step"] - data["roofline"][f"{plain} + int8 lm_head"]["gib_per_step"]
        assert saved == pytest.approx(head_gib)
    goal = "Int4 + int8 lm_head decode at batch 1 >= 2x float"
    assert data["goals"][goal] == (data["ratios"]["int4 + int8 lm_head/float batch 1"] >= 2)


@pytest.mark.parametrize("run", ["quant-memory", "quant-avx2-memory", "quant-7b-memory"])
def test_quant_memory_report(run: str) -> None:
    """The recorded ``quant --bits 4 --int8-lm-head --int8-embedding`` runs
    (AVX-512 + AMX against bf16 at the 1.8B shape compiled and the 7B shape;
    as AVX2 against float32): each engine's peak memory and what its loaded
    model holds (measured in the worker), the int8 runs with both vocabulary
    matrices in int8 rows; ratios and goals from those figures, and each model
    holding at least its weights."""
    from qwen_vllm.bench.shapes import SIZES

    result = recorded(run)
    data = result["data"]
    command = result["command"].split()
    width = 4 if "--float-dtype float32" in result["command"] else 2  # the float model's bytes per weight
    assert "--int8-embedding" in command
    names = ["float", "float + int8 lm_head and embedding", "int4", "int4 + int8 lm_head and embedding"]
    assert list(data["model_gib"]) == names == list(data["memory_gib"])
    for name in names[1:]:
        for kind, key in (("peak", "memory_gib"), ("model", "model_gib")):
            assert data["ratios"][f"{name}/float {kind} memory"] == pytest.approx(data[key][name] / data[key]["float"])
        label = "Int4" + name[len("int4"):]
        if name.startswith("int4"):
            assert data["goals"][f"{label} model memory <= 0.5x float"] == (data["ratios"][f"{name}/float model memory"] <= 0.5)
    shape = SIZES[command[command.index("--size") + 1]]
    vocab = shape["vocab"] * shape["hidden"] / 2**30  # one vocabulary matrix, a byte per weight
    layers = data["roofline"]["float"]["gib_per_step"] - width * vocab  # the float layers
    assert data["model_gib"]["float"] >= 0.95 * (layers + 2 * width * vocab)  # layers, embedding and lm_head
    assert data["model_gib"]["int4 + int8 lm_head and embedding"] >= 0.95 * (layers / (2 * width) + 2 * vocab)
    for name in names:
        assert 0 < data["model_gib"][name] < data["memory_gib"][name]
    for plain in ("float", "int4"):  # rounding the vocabulary at load peaks below what it saves
        assert data["memory_gib"][f"{plain} + int8 lm_head and embedding"] < data["memory_gib"][plain]


def test_quant_avx2_report() -> None:
    """The recorded ``quant --cpu-isa avx2 --float-dtype float32`` run: every
    engine as an AVX2-only CPU runs it (emulated on an AVX-512 one), Int4 on
    qwen-vllm's int4pack kernel, against a float32 model whose decode step
    reads four bytes a weight (the GPTQ models' bf16 lm_head two)."""
    from qwen_vllm.bench.shapes import SIZES

    result = recorded("quant-avx2")
    data = result["data"]
    assert result["machine"].startswith("x86_64 AVX2 only") and "emulated on AVX-512" in result["machine"]
    assert "--cpu-isa avx2" in result["command"] and "--float-dtype float32" in result["command"]
    assert data["kernels"]["float"] == "torch, float32" and data["kernels"]["int4"] == "qwen-vllm int4pack (PyTorch)"
    head = SIZES["1.8B"]["vocab"] * SIZES["1.8B"]["hidden"] / 2**30
    roof = {name: r["gib_per_step"] for name, r in data["roofline"].items()}
    assert roof["float"] - roof["float + int8 lm_head"] == pytest.approx(3 * head)
    assert roof["int4"] - roof["int4 + int8 lm_head"] == pytest.approx(head)
    tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
    assert data["ratios"]["int4 + int8 lm_head/float batch 1"] == pytest.approx(tok["int4 + int8 lm_head", 1] / tok["float", 1])


def test_quant_shape_models_declare_gptq_as_qwens_do(tmp_path: Path) -> None:
    """``bench quant``'s GPTQ layouts: Qwen's quantization_config (group 128), and
    every size that runs Int4/Int8 at TP=1 on CPU passes the pre-start check."""
    from qwen_vllm.bench.shapes import SIZES, write_shape_model
    from qwen_vllm.plugin.quantization import (
        check_engine_settings,
        read_quantization_config,
    )

    for bits in (4, 8):
        model = write_shape_model("1.8B", tmp_path / f"int{bits}", gptq_bits=bits)
        qcfg = read_quantization_config(model)
        assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == ("gptq", bits, 128, True, False)
        check_engine_settings(model)
    assert set(SIZES) == {"1.8B", "7B", "14B", "72B"}


def test_admission_report() -> None:
    """Latency grows by one reply per wave of --max-num-seqs queued ahead:
    the default bound (one wave) keeps admitted requests under ~2 replies."""
    data = recorded("admission")["data"]
    b, waves = data["max_num_seqs"], data["waves"]
    assert len(data["latencies_s"]) == data["requests"] == b * len(waves)
    assert [w["vs_first_wave"] for w in waves] == sorted(w["vs_first_wave"] for w in waves)
    assert 1.5 < waves[1]["vs_first_wave"] < 2.5 and waves[-1]["vs_first_wave"] > 3
    default = next(x for x in data["bounds"] if x["max_queued_requests"] == b)
    assert default["admitted_p99_s"] < 2.5 * waves[0]["median_s"]


def test_chaos_report() -> None:
    """Both phases on one stack, kills only in the chaos one, every request
    completed with the greedy reply."""
    from qwen_vllm.bench.stress import percentile

    data = recorded("chaos")["data"]
    calm, chaos = data["phases"]
    assert (calm["phase"], calm["kills"], chaos["phase"]) == ("calm", 0, "chaos") and chaos["kills"] >= 3
    assert data["stack_restarts"] >= chaos["kills"]
    for phase in (calm, chaos):
        assert phase["sent"] == phase["completed"] > 0 and phase["failed"] == phase["wrong_replies"] == 0
        assert 0 < phase["p50_s"] <= phase["p99_s"]
    assert all(data["goals"].values())
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0] * 99 + [9.0], 99) == 1.0
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([], 99) == 0.0


def test_versus_live_serving_half(bench_runs: dict) -> None:
    data = load(bench_runs, "versus")["data"]
    serving = {(r["target"], r["concurrency"]): r for r in data["serving"]}
    assert set(serving) == {(t, c) for t in ("native", "worker", "front") for c in (1, 8)}
    for r in serving.values():
        assert r["tok_s"] > 0 and r["median_ttft_ms"] > 0
        assert all(run["completed"] == r["concurrency"] for run in r["runs"])
    assert not data["offline"]


def test_versus() -> None:
    """The whole report (recorded): offline and serving, ratios, goals."""
    data = recorded("versus")["data"]
    offline = {(r["target"], r["batch"]): r for r in data["offline"]}
    assert set(offline) == {(t, b) for t in ("raw", "wrapper", "transformers") for b in (1, 8)}
    serving = {(r["target"], r["concurrency"]): r for r in data["serving"]}
    assert set(serving) == {(t, c) for t in ("native", "worker", "front") for c in (1, 8)}
    for r in [*offline.values(), *serving.values()]:
        assert r["tok_s"] > 0
    for r in serving.values():
        assert r["median_ttft_ms"] > 0 and all(run["completed"] == r["concurrency"] for run in r["runs"])
    check_ratios(data)
    assert "front concurrency 8 / serial transformers" in data["ratios"]
    assert set(data["goals"]) == {
        "vLLMWrapper vs transformers static batch 8 >= 2x",
        "worker concurrency 8 vs serial transformers >= 4x",
        "front concurrency 8 vs serial transformers >= 4x",
    }
    assert all(isinstance(v, bool) for v in data["goals"].values())


def test_cpu_defaults_variants_differ_only_where_named(monkeypatch) -> None:
    """What each cpu-defaults engine is started with (no engine): all get our
    KV space; vLLM's side differs in the binding only, the preload variant in
    the opt-in only, a max_num_batched_tokens variant in that engine argument."""
    from qwen_vllm.bench.report import add_arguments, cpu_variants
    from qwen_vllm.runtime.cpu import PRELOAD_ENV, preload_value

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    variants = cpu_variants(parser.parse_args(["cpu-defaults", "--max-batched-tokens", "512"]))
    ours = variants["ours (bind all cores)"]
    assert ours["env"] == {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in sorted(os.sched_getaffinity(0))),
                           "VLLM_CPU_KVCACHE_SPACE": "3", PRELOAD_ENV: "0"} and ours["engine"] == {}  # fmt: skip
    assert variants["vLLM default (reserve one core)"] == {"env": {**ours["env"], "VLLM_CPU_OMP_THREADS_BIND": "auto"}, "engine": {}}
    assert variants["ours + max_num_batched_tokens=512"] == {"env": ours["env"], "engine": {"max_num_batched_tokens": 512}}
    args = parser.parse_args(["cpu-defaults", "--compare-preload"])
    if preload_value(os.environ.get("LD_PRELOAD", "")):
        assert cpu_variants(args)["ours + LD_PRELOAD"] == {"env": {**ours["env"], PRELOAD_ENV: "1"}, "engine": {}}
    else:
        with pytest.raises(ValueError, match="neither tcmalloc nor Intel OpenMP is installed"):
            cpu_variants(args)


def test_cpu_defaults() -> None:
    """The whole report (recorded; each engine is the profile's job, run live above)."""
    data = recorded("cpu-defaults")["data"]
    engines = data["engines"]
    vllm = engines["vLLM default (reserve one core)"]
    assert vllm["omp_threads_bind"] == "auto"
    for e in engines.values():
        assert e["kv_cache_tokens"] > 0 and e["max_num_batched_tokens"] > 0
    batches = sorted({r["batch"] for r in data["rows"]})
    assert {(r["target"], r["batch"]) for r in data["rows"]} == {(v, b) for v in engines for b in batches}
    assert all(r["tok_s"] > 0 for r in data["rows"])
    check_ratios(data)
    if "ours + LD_PRELOAD" in engines:  # --compare-preload
        assert "libtcmalloc" in engines["ours + LD_PRELOAD"]["ld_preload"]
        tok = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"]}
        for b in batches:
            gain = tok["ours + LD_PRELOAD", b] / tok["ours (bind all cores)", b]
            assert data["ratios"][f"LD_PRELOAD gain batch {b}"] == pytest.approx(gain)


# -- no engine ------------------------------------------------------------------
@pytest.mark.parametrize("size", ["1.8B", "7B", "14B", "72B"])
def test_shape_model_has_the_real_config(size: str, tmp_path: Path) -> None:
    from qwen_vllm.bench.shapes import SIZES, write_shape_model
    from qwen_vllm.errors import QwenCheckpointError
    from qwen_vllm.plugin.checkpoint import read_config, validate_checkpoint
    from qwen_vllm.plugin.config import QWenConfig

    model = write_shape_model(size, tmp_path / size)
    cfg, want = read_config(model), SIZES[size]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (
        want["hidden"], want["layers"], want["heads"],
    )  # fmt: skip
    assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["seq_length"], cfg["rotary_emb_base"]) == (
        want["intermediate"], want["vocab"], want["seq"], want["rope"],
    )  # fmt: skip
    assert QWenConfig(**cfg).intermediate_size == want["intermediate"] // 2  # the real MLP width
    validate_checkpoint(model, need_weights=False)  # tokenizer files and config are complete
    with pytest.raises(QwenCheckpointError, match="no weights"):
        validate_checkpoint(model)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["profile", "--model", "/nonexistent/qwen"], "not a directory"),
        (["profile", "--size", "14B", "--new-tokens", "4096"], "does not fit the model's 2048-token context"),
        (["versus", "--size", "1.8B", "--batches", "0"], "must be at least 1"),
        (["quant", "--new-tokens", "4"], "give --size"),
        (["quant", "--size", "1.8B", "--dtype", "float32"], "vLLM runs GPTQ in float16 or bfloat16, not float32"),
        (["quant", "--size", "1.8B", "--dtype", "bfloat16", "--prefill-tokens", "0"], "must be at least 1"),
        (["quant", "--size", "1.8B", "--dtype", "bfloat16", "--int8-embedding"], "--int8-embedding goes with --int8-lm-head"),
        (["llamacpp", "--new-tokens", "4"], "give --size"),
        (["llamacpp", "--size", "1.8B", "--dtype", "float32"], "not float32: give --dtype, or --bits with none"),
        (["llamacpp", "--size", "1.8B", "--dtype", "bfloat16", "--llamacpp-python", "/nonexistent/python"],
         "no llama.cpp environment; run `make setup-llamacpp`"),
        (["versus", "--only", "serving", "--target", "native"], "give NAME=URL"),
        (["versus", "--only", "serving", "--target", "native=http://127.0.0.1:9", "--target-model", "front=scripted"],
         "for a NAME given with --target"),
    ],
)
def test_bad_arguments_fail_before_any_engine(argv: list[str], message: str, capsys) -> None:
    from qwen_vllm.cli import main

    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_llamacpp_gguf_tensors_are_our_qwen2_conversion(random_model: Path, random_qwen2: Path) -> None:
    """``bench llamacpp`` writes GGUF tensors by the Qwen2 names and shapes that
    ``convert_to_qwen2`` writes (the same schema, plugin/weights.py)."""
    from safetensors import safe_open

    from qwen_vllm.bench.llamacpp import qwen2_tensors
    from qwen_vllm.plugin.checkpoint import read_config

    converted = {}
    for shard in random_qwen2.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            converted |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert dict(qwen2_tensors(read_config(random_model))) == converted


def test_llamacpp_report() -> None:
    """The recorded Qwen-1.8B-shape run (ours compiled, llama.cpp built for the
    CPU's AVX-512 without its AMX kernels, which crash on Q8_0/Q4_0): every
    target at every concurrency, the ratios from its rows, both goals judged."""
    result = recorded("llamacpp")
    data = result["data"]
    tok = {(r["target"], r["concurrency"]): r["tok_s"] for r in data["rows"]}
    targets = ("float", "int4", *(f"llama.cpp {k}" for k in ("F16", "Q8_0", "Q4_0")))
    assert sorted(tok) == sorted((t, c) for t in targets for c in (1, 8))
    for kind, mine in (("F16", "float"), ("Q4_0", "int4")):  # run with --bits 4: no int8 for Q8_0
        for c in (1, 8):
            want = tok[mine, c] / tok[f"llama.cpp {kind}", c]
            assert data["ratios"][f"{mine} / llama.cpp {kind} concurrency {c}"] == pytest.approx(want)
    assert data["failed"] == {} and result["compiled"] is True and result["rounds"] == 3
    assert data["goals"] == {
        "Int4 vs Q4_0 at batch 1 >= 1x": data["ratios"]["int4 / llama.cpp Q4_0 concurrency 1"] >= 1,
        "Int4 vs Q4_0 at concurrency 8 >= 2x": data["ratios"]["int4 / llama.cpp Q4_0 concurrency 8"] >= 2,
    }
    assert data["llamacpp"] == "llama-cpp-python 0.3.36"


def test_llamacpp_avx2_report() -> None:
    """The recorded ``llamacpp --cpu-isa avx2`` run: ours as an AVX2-only CPU runs
    it (emulated), against a llama.cpp build with AVX2 and nothing above it."""
    result = recorded("llamacpp-avx2")
    data = result["data"]
    assert result["machine"].startswith("x86_64 AVX2 only") and "emulated on AVX-512" in result["machine"]
    assert data["llamacpp"] == "llama-cpp-python 0.3.36 (AVX2)" and "--cpu-isa avx2" in result["command"]
    tok = {(r["target"], r["concurrency"]): r["tok_s"] for r in data["rows"]}
    assert sorted(tok) == sorted((t, c) for t in ("float", "int4", "llama.cpp Q4_0") for c in (1, 8))
    for c in (1, 8):
        want = tok["int4", c] / tok["llama.cpp Q4_0", c]
        assert data["ratios"][f"int4 / llama.cpp Q4_0 concurrency {c}"] == pytest.approx(want)
    assert data["goals"]["Int4 vs Q4_0 at batch 1 >= 1x"] == (data["ratios"]["int4 / llama.cpp Q4_0 concurrency 1"] >= 1)
