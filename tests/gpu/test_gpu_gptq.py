"""GPTQ Int4/Int8 on CUDA: Qwen's auto-gptq checkpoints through vLLM's Marlin
and Machete kernels vs the exact float weights they encode.

The CPU suite (tests/test_gptq.py) proves the packing and qwen-vllm's CPU
GPTQ kernel (PyTorch's int4pack/int8pack). On a GPU, vLLM's ``auto_gptq`` method picks a
mixed-precision kernel per layer (choose_mp_linear_kernel, in CUDA priority
order CutlassW4A8 > Machete > Marlin > ...; CutlassW4A8 needs FP8
activations, Machete compute capability exactly 9.0) and
``VLLM_DISABLED_KERNELS`` (class names) takes kernels out of the running, so
each kernel is selected on purpose and then checked to be the one that ran.
qwen-vllm's CPU kernel (qwen_vllm/plugin/cpu_gptq.py) must never be
registered on a GPU, in any process.

The fixture is the CPU suite's random GPTQ fixture made wider (hidden 256,
group 64): Machete takes group sizes -1/64/128 only and per-rank shapes in
multiples of its 64 x 128 prepack block, also at tensor-parallel size 2.
The reference is the plain-torch Qwen forward of tests/test_long_context.py on
the dequantized float32 copy make_model writes beside each checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_gptq import LOGPROB_TOL, NEW_TOKENS, prompt_ids  # noqa: F401 (prompt_ids is a fixture)
from test_long_context import QwenReference, check_teacher_forced_greedy, run

HIDDEN, HEADS, MLP, LAYERS = 256, 4, 512, 2
GROUP = 64
MAX_MODEL_LEN = 512
# |delta logprob| vs the float32 reference. float16: test_gptq.LOGPROB_TOL
# (0.05; its derivation holds: fp16 activations, the reference under CPU fp16
# autocast differs by at most 0.015 on this fixture, a layout error by nats).
# bfloat16 keeps 3 fewer bits: the reference under CPU bf16 autocast differs by
# up to 0.11 (Int4 and Int8); 0.4 leaves room for Marlin/Machete's own rounding.
TOL = {"float16": LOGPROB_TOL, "bfloat16": 0.4}
# (kernel expected, kernel disabled so that the other one cannot be picked)
KERNELS = {"marlin": ("MarlinLinearKernel", "MacheteLinearKernel"), "machete": ("MacheteLinearKernel", "MarlinLinearKernel")}
QUANTIZED_PER_LAYER = 4  # qkv_proj (c_attn), o_proj (c_proj), gate_up_proj (w2 + w1), down_proj (mlp.c_proj)


@pytest.fixture(scope="module")
def gptq_models(fixtures_root: Path) -> dict[int, tuple[Path, Path]]:
    """bits -> (GPTQ checkpoint, the float32 checkpoint of the weights it encodes)."""
    from qwen_vllm.checkpoints.fixtures import make_model

    out = {}
    for bits in (4, 8):
        quant, ref = fixtures_root / f"gpu-gptq-int{bits}", fixtures_root / f"gpu-gptq-int{bits}-reference"
        if not quant.exists():
            make_model(quant, "random", hidden_size=HIDDEN, num_heads=HEADS, mlp_width=MLP, num_layers=LAYERS,
                       gptq_bits=bits, gptq_group_size=GROUP, gptq_reference=ref)  # fmt: skip
        out[bits] = (quant, ref)
    return out


@pytest.fixture(scope="module")
def references(gptq_models: dict[int, tuple[Path, Path]]) -> dict[int, QwenReference]:
    return {bits: QwenReference(ref) for bits, (_, ref) in gptq_models.items()}


def kernel_probe() -> Callable[[torch.nn.Module], dict]:
    """A function for ``LLM.apply_model`` (run in every worker): the linear
    method and kernel of each quantized layer, and whether qwen-vllm's CPU
    kernel is registered in that process. A closure, so it is pickled by value and
    the workers need not import this test module."""

    def probe(model: torch.nn.Module) -> dict:
        from vllm.model_executor.kernels import linear

        layers = [
            (type(m.quant_method).__name__, type(m.quant_method.kernel).__name__)
            for m in model.modules()
            if getattr(getattr(m, "quant_method", None), "kernel", None) is not None
            and "Unquantized" not in type(m.quant_method).__name__
        ]
        ours = [k.__name__ for kernels in linear._POSSIBLE_KERNELS.values() for k in kernels if k.__module__.startswith("qwen_vllm")]
        return {"layers": layers, "cpu_kernels": ours}

    return probe


def check_capability(kernel: str, dtype: str) -> None:
    """Skip what this GPU cannot run, as vLLM's kernels decide it."""
    from vllm.platforms import current_platform

    cap = current_platform.get_device_capability()
    if kernel == "machete" and not current_platform.is_device_capability(90):
        pytest.skip(f"Machete needs compute capability 9.0 (Hopper), this GPU has {cap}")
    if not current_platform.has_device_capability(75):
        pytest.skip(f"Marlin needs compute capability 7.5, this GPU has {cap}")
    if dtype == "bfloat16" and not current_platform.has_device_capability(80):
        pytest.skip(f"bfloat16 needs compute capability 8.0, this GPU has {cap}")


def gptq_engine_run(gpu_engine: Callable[..., Any], model: Path, kernel: str, dtype: str, prompts: list[list[int]], tp: int) -> dict:
    expected, disabled = KERNELS[kernel]
    env = {"VLLM_DISABLED_KERNELS": disabled, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # apply_model sends a function
    with gpu_engine(
        model, env=env, dtype=dtype, enforce_eager=True, max_model_len=MAX_MODEL_LEN, tensor_parallel_size=tp
    ) as llm:
        cfg = llm.llm_engine.vllm_config
        return {
            "expected": expected,
            "quantization": cfg.model_config.quantization,
            "engine_dtype": cfg.model_config.dtype,
            "workers": llm.apply_model(kernel_probe()),
            "outputs": run(llm, prompts, max_tokens=NEW_TOKENS),
        }


CASES = [(k, b, d) for k in KERNELS for b in (4, 8) for d in ("float16", "bfloat16")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-int{c[1]}-{c[2]}")
def tp1(
    request: pytest.FixtureRequest, gptq_models: dict, prompt_ids: list[list[int]], gpu_engine: Callable[..., Any]
) -> dict:
    """One TP=1 engine per (kernel, bits, dtype), no quantization= (GPTQ is
    auto-detected from config.json)."""
    kernel, bits, dtype = request.param
    check_capability(kernel, dtype)
    quant, _ = gptq_models[bits]
    return {"bits": bits, "dtype": dtype, **gptq_engine_run(gpu_engine, quant, kernel, dtype, prompt_ids, tp=1)}


@pytest.fixture(scope="module", params=[4, 8], ids=lambda b: f"marlin-int{b}-float16")
def tp2(
    request: pytest.FixtureRequest, gptq_models: dict, prompt_ids: list[list[int]], gpu_engine: Callable[..., Any]
) -> dict:
    bits = request.param
    check_capability("marlin", "float16")
    quant, _ = gptq_models[bits]
    return {"bits": bits, "dtype": "float16", **gptq_engine_run(gpu_engine, quant, "marlin", "float16", prompt_ids, tp=2)}


def check_kernels(run_data: dict, tp: int) -> None:
    assert run_data["quantization"] == "auto_gptq"  # detected from config.json, no quantization= given
    assert run_data["engine_dtype"] == getattr(torch, run_data["dtype"])
    assert len(run_data["workers"]) == tp  # one report per tensor-parallel rank
    for worker in run_data["workers"]:
        layers = [tuple(pair) for pair in worker["layers"]]  # pairs come back from the worker as lists
        assert len(layers) == QUANTIZED_PER_LAYER * LAYERS, layers
        assert set(layers) == {("AutoGPTQLinearMethod", run_data["expected"])}, layers


def check_cpu_kernel_absent(run_data: dict) -> None:
    for worker in run_data["workers"]:
        assert worker["cpu_kernels"] == [], worker
    # ... and not in this process either (the plugin ran here too).
    from vllm.model_executor.kernels import linear

    assert not [k for kernels in linear._POSSIBLE_KERNELS.values() for k in kernels if k.__module__.startswith("qwen_vllm")]


def check_against_reference(run_data: dict, reference: QwenReference) -> None:
    """The reference scoring vLLM's own sequences, within the dtype's tolerance."""
    check_teacher_forced_greedy(lambda ids: reference.logprobs(ids, 1), run_data["outputs"], TOL[run_data["dtype"]])


def test_kernel_is_the_one_selected(tp1: dict) -> None:
    """Every quantized linear of the model runs AutoGPTQ through the kernel
    this case selected (no silent fall-back to another kernel)."""
    check_kernels(tp1, tp=1)


def test_cpu_kernel_never_registered(tp1: dict) -> None:
    check_cpu_kernel_absent(tp1)


def test_equals_dequantized_reference(tp1: dict, references: dict[int, QwenReference]) -> None:
    check_against_reference(tp1, references[tp1["bits"]])


@pytest.mark.gpus(2)
def test_tensor_parallel_2(tp2: dict, references: dict[int, QwenReference]) -> None:
    """TP=2: the fused c_attn split per rank, row-parallel scales sharded;
    both ranks on Marlin, no CPU kernel, output within tolerance of the reference."""
    check_kernels(tp2, tp=2)
    check_cpu_kernel_absent(tp2)
    check_against_reference(tp2, references[tp2["bits"]])
