"""LoRA adapters served unmerged on CUDA vs the plain-torch reference on the
same adapter merged into float32 weights (merge-lora), on the paths a GPU
takes that the CPU suite cannot.

The CPU suite (tests/test_lora.py, tests/test_gptq.py) runs vLLM's pure-torch
Punica path in eager mode (vLLM forces CompilationMode.NONE for LoRA on CPU).
On a GPU vLLM applies adapters with its Triton Punica kernels
(vllm/lora/punica_wrapper/punica_gpu.py), compiles the model and captures CUDA
graphs per count of active adapters (Model Runner V2:
vllm/v1/worker/gpu/lora_utils.py), slices the fused qkv and gate_up LoRA per
tensor-parallel rank, and runs GPTQ layers through Marlin under the adapter.

One batch per engine mixes the base model and two adapters (r=64 on all four
targets; r=8 on c_attn and w2 only). Engines start one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_gpu_gptq import check_against_reference, check_capability, gptq_models  # noqa: F401 (a fixture)
from test_gpu_long_context import (
    BF16_MEAN_TOL,
    CAPTURE_MAX,
    FP32_ENV,
    Variant,
    check_teacher_forced,
    mean_delta,
)
from test_long_context import QwenReference, random_prompt, run, scored

from qwen_vllm.checkpoints.lora import LORA_DEFAULTS, make_adapter, merge_lora

PROMPTS = [random_prompt(n, seed=100 + n) for n in (7, 20, 45)]
NEW_TOKENS = 16
MAX_MODEL_LEN = 512
# (Model Runner V2, eager, dtype): vLLM 0.32's CUDA default (V2, compiled,
# CUDA graphs) in both dtypes, eager V2 in float32 (the tight bound), and V1.
VARIANTS = [Variant(True, False, "bfloat16"), Variant(True, False, "float32"), Variant(True, True, "float32"),
            Variant(False, False, "bfloat16")]  # fmt: skip


@pytest.fixture(scope="module")
def adapters(random_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, QwenReference]]:
    """name -> (adapter, the reference on the base with it merged); "base": (None, the base's)."""
    root = tmp_path_factory.mktemp("gpu-lora")
    out: dict[str, tuple[Path | None, QwenReference]] = {"base": (None, QwenReference(random_model))}
    made = {
        "a": make_adapter(random_model, root / "a", seed=1),
        "b": make_adapter(random_model, root / "b", rank=8, alpha=16, seed=2, targets=["c_attn", "w2"]),
    }
    for name, adapter in made.items():
        out[name] = (adapter, QwenReference(merge_lora(random_model, adapter, root / f"merged-{name}", torch.float32)))
    return out


def mixed_run(llm: Any, adapters: dict) -> list[tuple[str, dict]]:
    """Every prompt under the base and each adapter, all in one generate call."""
    from vllm.lora.request import LoRARequest

    names = list(adapters)
    cases = [(name, p) for p in PROMPTS for name in names]
    requests = {n: None if a is None else LoRARequest(n, i + 1, str(a)) for i, (n, (a, _)) in enumerate(adapters.items())}
    results = run(llm, [p for _, p in cases], NEW_TOKENS, lora=[requests[n] for n, _ in cases])
    return [(name, r) for (name, _), r in zip(cases, results, strict=True)]


def test_the_adapters_move_the_reference(adapters: dict) -> None:
    """The bounds below mean something: each merged adapter moves every
    prompt's mean logprob by more than twice the bfloat16 mean bound (the
    CPU reference measures 0.54 to 1.5 nats per prompt)."""
    base = adapters["base"][1]
    for name in ("a", "b"):
        ref = adapters[name][1]
        for p in PROMPTS:
            moved = mean_delta(scored(ref.logprobs(p, 1), p, 1), scored(base.logprobs(p, 1), p, 1))
            assert moved > 2 * BF16_MEAN_TOL, (name, len(p), moved)


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.id)
def variant_run(request: pytest.FixtureRequest, random_model: Path, adapters: dict, gpu_engine: Callable[..., Any]) -> dict:
    from vllm.config import CUDAGraphMode

    variant: Variant = request.param
    kwargs = {**variant.engine_kwargs(), "max_model_len": MAX_MODEL_LEN, "enable_lora": True, **LORA_DEFAULTS}
    with gpu_engine(random_model, env=variant.env(), **kwargs) as llm:
        cfg = llm.llm_engine.vllm_config
        return {
            "variant": variant,
            "v2_runner": cfg.use_v2_model_runner,
            "cudagraphs": cfg.compilation_config.cudagraph_mode != CUDAGraphMode.NONE,
            "lora": cfg.lora_config is not None,
            "results": mixed_run(llm, adapters),
        }


def test_engine_runs_the_variant_asked_for(variant_run: dict) -> None:
    variant = variant_run["variant"]
    assert variant_run["lora"] and variant_run["v2_runner"] == variant.v2_runner
    assert variant_run["cudagraphs"] == (not variant.eager)


def test_base_and_adapters_in_one_batch_equal_the_merged_reference(variant_run: dict, adapters: dict) -> None:
    for name, result in variant_run["results"]:
        check_teacher_forced(adapters[name][1], result, variant_run["variant"].dtype, alpha=1)


@pytest.mark.gpus(2)
def test_tensor_parallel_2(random_model: Path, adapters: dict, gpu_engine: Callable[..., Any]) -> None:
    """Each rank applies its slice of the fused qkv (q, k and v rows of lora_B)
    and of gate_up; row-parallel o_proj/down_proj slice lora_A."""
    kwargs = dict(dtype="float32", enforce_eager=False, max_model_len=MAX_MODEL_LEN, tensor_parallel_size=2,
                  compilation_config={"max_cudagraph_capture_size": CAPTURE_MAX}, enable_lora=True, **LORA_DEFAULTS)  # fmt: skip
    with gpu_engine(random_model, env=FP32_ENV, **kwargs) as llm:
        results = mixed_run(llm, adapters)
    for name, result in results:
        check_teacher_forced(adapters[name][1], result, "float32", alpha=1)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.gpus(2))])
def test_qlora_on_marlin_equals_the_merged_dequantized_reference(
    tp: int, gptq_models: dict, tmp_path: Path, gpu_engine: Callable[..., Any]
) -> None:
    """A Q-LoRA adapter (float16, trained on the Int4 model) on the Int4
    checkpoint through Marlin, vs the float weights it encodes with it merged."""
    from vllm.lora.request import LoRARequest

    check_capability("marlin", "float16")
    quant, ref = gptq_models[4]
    adapter = make_adapter(quant, tmp_path / "qlora", seed=3)
    reference = QwenReference(merge_lora(ref, adapter, tmp_path / "merged", torch.float32))
    env = {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}
    with gpu_engine(quant, env=env, dtype="float16", max_model_len=MAX_MODEL_LEN, tensor_parallel_size=tp,
                    enable_lora=True, **LORA_DEFAULTS) as llm:  # fmt: skip
        outputs = run(llm, PROMPTS, NEW_TOKENS, lora=LoRARequest("qlora", 1, str(adapter)))
    check_against_reference({"dtype": "float16", "outputs": outputs}, reference)
