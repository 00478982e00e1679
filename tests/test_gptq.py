"""GPTQ checkpoints: the auto-gptq packer, the CPU Int4 fallback
kernel, the hardware errors, and real engines on a GPTQ Int4 fixture compared
with transformers on the exact float weights the fixture encodes.

Engines, both through vLLMWrapper (no ``quantization=``: auto-detected), one
after the other, both with LoRA on: Int4 at TP=1 and Int8 at TP=2, each with a
Q-LoRA adapter (trained on the quantized model, as Qwen's finetune.py does)
served unmerged against transformers on the float weights with the adapter
merged. The Int8 fixture is a base model, so its engine also checks the
wrapper's base-model behaviour; it holds its lm_head as int8 rows (the
opt-in, plugin/lm_head.py), which its reference holds rounded the same way;
the Int4 engine holds its lm_head once (the default). Then, without engines: the worker's and the stack's
flags turned into vLLM's engine config as its API server does, and the
errors vLLM's own entry point (vllm.LLM) gets from the plugin's config hook.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from greedy_reference import (
    PROMPTS,
    transformers_scorer,
)
from test_lm_head import embedding_weight, lm_head_weight, rounded_rows, rounded_tokens
from test_long_context import check_teacher_forced_greedy, run

from qwen_vllm.errors import QwenQuantizationError

GROUP = 32  # hidden 128 / MLP 256: 4 and 8 groups per row; 2 and 4 per TP=2 rank
NEW_TOKENS = 24
# Prompt log-probs, float16 GPTQ engine vs the float32 reference. float16 keeps
# 11 significant bits in every activation: transformers itself, on the same
# reference weights in float16 vs float32, differs by up to 1.0e-2 on these
# prompts, and the GPTQ engine measured 1.0e-2 (TP=2 vs TP=1: 1.0e-2). A
# layout mistake is far larger: the reference with each word's nibbles
# reversed differs by 12. 0.05 sits 5x above the noise, 240x below the error.
LOGPROB_TOL = 0.05
# CPU engines: qwen-vllm's kernel decodes in bf16 (plugin/cpu_gptq.py), rounding
# activations and scales to 8 bits, far below Int4's own error (measured 0.057
# with the Q-LoRA adapter on the Int4 fixture, AVX-512 + AMX).
CPU_LOGPROB_TOL = 0.1


# -- fixture checkpoints (no engine) ------------------------------------------------
@pytest.fixture(scope="module")
def gptq_dirs(fixtures_root):
    """(int4 dir, its float32 reference dir, int8 dir); the int8 reference is beside it (int8_reference)."""
    from qwen_vllm.checkpoints.fixtures import make_model

    int4 = fixtures_root / "gptq-int4"
    ref = fixtures_root / "gptq-int4-reference"
    if not int4.exists():
        make_model(int4, "random", gptq_bits=4, gptq_group_size=GROUP, gptq_reference=ref)
    int8 = fixtures_root / "gptq-int8"
    if not int8.exists():  # a base (non-chat) model: its engine also checks the wrapper's base-model path
        make_model(int8, "random", chat=False, gptq_bits=8, gptq_group_size=GROUP,
                   gptq_reference=fixtures_root / "gptq-int8-reference")  # fmt: skip
    return int4, ref, int8


def test_packer_matches_vllm_layout_and_rounds_to_nearest() -> None:
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    from qwen_vllm.checkpoints.gptq_pack import dequantize, quantize_rtn, unpack_int32

    torch.manual_seed(0)
    w = torch.randn(96, 128)
    for bits, wtype in ((4, scalar_types.uint4b8), (8, scalar_types.uint8b128)):
        t = quantize_rtn(w, bits, GROUP)
        q = unpack_int32(t.qweight, bits, dim=0)
        # vLLM's own packer (the order its GPTQ loaders and kernels read) agrees.
        assert torch.equal(pack_quantized_values_into_int32(q, wtype, packed_dim=0), t.qweight)
        assert t.qweight.shape == (128 * bits // 32, 96) and t.qweight.dtype == torch.int32
        assert t.scales.shape == (128 // GROUP, 96) and t.scales.dtype == torch.float16
        assert t.qzeros.shape == (128 // GROUP, 96 * bits // 32)
        assert torch.equal(t.g_idx, torch.arange(128, dtype=torch.int32) // GROUP)
        # auto-gptq v1 zeros: 2**(bits-1) stored minus one -> 0x77777777 for 4 bits.
        assert torch.all(unpack_int32(t.qzeros, bits, dim=1) == 2 ** (bits - 1) - 1)
        err = (dequantize(t, bits) - w).abs()
        half_step = t.scales.float().repeat_interleave(GROUP, 0).t() / 2
        # Half a step, plus the fp16 rounding of the scale (relative 2**-11) where
        # +max clips to the top level.
        assert torch.all(err <= half_step + w.abs() * 2**-10)
    assert bits == 8 and err.max() < 0.02  # 8 bits are finer than 4


def _dequantized_product(t, x: torch.Tensor, bias=None, bits: int = 4) -> torch.Tensor:
    """x @ W (+ bias) in float32 for the exact dequantized W; vLLM keeps the
    scales in the activation dtype (bfloat16 rounds fp16 scales)."""
    from qwen_vllm.checkpoints.gptq_pack import unpack_int32

    rows = t.qweight.shape[0] * (32 // bits) // t.scales.shape[0]
    q = unpack_int32(t.qweight, bits, dim=0)
    w = (q - 2 ** (bits - 1)).float() * t.scales.to(x.dtype).float().repeat_interleave(rows, 0)
    return x.float() @ w + (0 if bias is None else bias.float())


# qwen-vllm's kernel (plugin/cpu_gptq.py), relative to the largest output. Below
# DENSE_FROM_M rows PyTorch's int4pack kernel computes in bf16 (activations and
# scales rounded to 8 bits: 2**-8 = 0.004 each); from it, and for Int8 always, a
# dense GEMM in the activation dtype (fp32: float32 rounding only; fp16/bf16: one
# rounding of the weight).
TORCH_KERNEL_TOL = {"packed": 0.012, torch.float32: 1e-5, torch.float16: 0.002, torch.bfloat16: 0.012}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("group", "dtype"), [(128, torch.float16), (32, torch.bfloat16), (-1, torch.float32), (64, torch.float32)])
def test_torch_kernel_equals_dequantized_matmul(bits, group, dtype, monkeypatch) -> None:
    """Both paths (decode-sized and prefill-sized batches) against x @ W for the
    exact dequantized W, on this CPU's ATen capability."""
    from qwen_vllm.checkpoints.gptq_pack import quantize_rtn, vllm_gptq_layer
    from qwen_vllm.plugin import cpu_gptq
    from qwen_vllm.plugin.cpu_gptq import DENSE_FROM_M, TorchGPTQLinearKernel

    monkeypatch.setattr(cpu_gptq, "vllm_native_int4", lambda: False)  # as on AVX2, whatever this CPU is

    torch.manual_seed(1)
    k, n = 256, 640  # 640: several dense blocks, the last one partial
    t = quantize_rtn(torch.randn(n, k) / 16, bits, group)
    bias = torch.randn(n).to(dtype)
    kernel, layer = vllm_gptq_layer(TorchGPTQLinearKernel, t, bits, group, dtype, bias)
    assert layer.qzeros is None and layer.qweight.dtype == (torch.uint8 if bits == 4 else dtype)
    packed = "packed" if bits == 4 else dtype  # Int8 is dequantized at load: a float linear at every M
    for m, path in ((1, packed), (DENSE_FROM_M - 1, packed), (DENSE_FROM_M, dtype), (130, dtype)):
        x = torch.randn(m, k).to(dtype)
        got = kernel.apply_weights(layer, x[None], layer.bias)  # [1, M, K] as vLLM may pass it
        want = _dequantized_product(t, x, bias, bits)
        rel = ((got[0].float() - want).abs().max() / want.abs().max()).item()
        assert got.shape == (1, m, n) and got.dtype == dtype
        assert rel <= TORCH_KERNEL_TOL[path], (m, path, rel)


def test_torch_kernel_is_vllms_choice_where_vllm_has_none(monkeypatch) -> None:
    """After install(), vLLM's kernel selection picks qwen-vllm's kernel for
    GPTQ Int8 on every CPU and for Int4 except bf16 Int4 where vLLM's library
    has its own (AVX-512); both branches forced on every CPU."""
    from vllm.model_executor.kernels.linear import (
        MPLinearLayerConfig,
        choose_mp_linear_kernel,
    )
    from vllm.scalar_type import scalar_types

    from qwen_vllm.plugin import cpu_gptq

    assert cpu_gptq.install() and cpu_gptq.install()  # idempotent

    def chosen(dtype, bits=4):
        wt = scalar_types.uint4b8 if bits == 4 else scalar_types.uint8b128
        return choose_mp_linear_kernel(MPLinearLayerConfig((2048, 6144), (2048, 6144), wt, dtype, 128, False)).__name__

    for native in (True, False):
        monkeypatch.setattr(cpu_gptq, "vllm_native_int4", lambda native=native: native)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            vllms = native and dtype == torch.bfloat16
            assert chosen(dtype) == ("CPUWNA16LinearKernel" if vllms else "TorchGPTQLinearKernel")
            assert chosen(dtype, 8) == "TorchGPTQLinearKernel"
            assert ("qwen-vllm" in cpu_caps_for(avx512=native).int4_path(str(dtype)[6:])) == (not vllms)


def cpu_caps_for(avx512: bool):
    import dataclasses

    from qwen_vllm.runtime.cpu import cpu_caps

    return dataclasses.replace(cpu_caps(), avx512=avx512, amx=avx512 and cpu_caps().amx)


# vLLM's native kernel, relative to the largest output: W4A16 rounds the output
# once to fp16/bf16 (bf16 keeps 8 bits: 2**-8 = 0.004 of the largest value).
# W4A8 (bf16 on AMX) also quantizes each activation row to int8 (a step of
# max|x|/127, 0.8% of the row's range), measured at 0.005 relative here.
NATIVE_TOL = {"W4A16": 0.01, "W4A8": 0.02}


@pytest.mark.parametrize(("dtype", "w4a8"), [(torch.float16, "1"), (torch.bfloat16, "1"), (torch.bfloat16, "0")])
def test_native_kernel_equals_dequantized_matmul(dtype, w4a8, monkeypatch) -> None:
    """vLLM's own cpu_gemm_wna16 / int4_scaled_mm_cpu where this CPU's vLLM
    library has them (AVX-512; W4A8 is what bf16 Int4 runs on AMX)."""
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import (
        CPUWNA16LinearKernel,
    )
    from vllm.platforms import current_platform

    from qwen_vllm.checkpoints.gptq_pack import quantize_rtn, vllm_gptq_layer
    from qwen_vllm.runtime.cpu import cpu_caps

    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", w4a8)
    caps = cpu_caps()
    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip(f"{caps.isa}: vLLM's library here has no Int4 kernel (qwen-vllm's runs GPTQ)")
    torch.manual_seed(3)
    k, n, m, group = 256, 384, 9, 64
    t = quantize_rtn(torch.randn(n, k) / 16, 4, group)
    bias = torch.randn(n).to(dtype)
    kernel, layer = vllm_gptq_layer(CPUWNA16LinearKernel, t, 4, group, dtype, bias)
    path = "W4A8" if layer.use_w4a8 else "W4A16"
    assert ("W4A8" in caps.int4_path(str(dtype).removeprefix("torch."))) == layer.use_w4a8
    x = torch.randn(m, k).to(dtype)
    got = kernel.apply_weights(layer, x, layer.bias)
    want = _dequantized_product(t, x, bias)
    rel = ((got.float() - want).abs().max() / want.abs().max()).item()
    print(f"{caps.isa}, {dtype}: {path}, max error {rel:.4f} of the largest output")
    assert got.shape == (m, n) and rel <= NATIVE_TOL[path], (path, rel)


@pytest.mark.parametrize("bits", [4, 8])
def test_make_model_cli_writes_qwen_gptq_layout(tmp_path, bits) -> None:
    """``qwen-vllm make-model --gptq 4|8``: Qwen-7B-Chat-Int4/Int8's files and
    tensors, and a float32 reference holding exactly what they encode."""
    from safetensors import safe_open

    from qwen_vllm.checkpoints.gptq_pack import GPTQTensors, dequantize
    from qwen_vllm.cli import main

    out, ref = tmp_path / f"int{bits}", tmp_path / "ref"
    args = ["make-model", str(out), "--gptq", str(bits), "--group-size", "64", "--gptq-reference", str(ref), "--layers", "1"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {**json.loads((out / "quantize_config.json").read_text()), "quant_method": "gptq"}
    assert cfg["quantization_config"]["bits"] == bits and cfg["quantization_config"]["group_size"] == 64
    assert cfg["quantization_config"]["sym"] is True and cfg["quantization_config"]["desc_act"] is False
    assert cfg["torch_dtype"] == "float16" and "quantization_config" not in json.loads((ref / "config.json").read_text())
    tensors, ref_tensors = {}, {}
    for d, into in ((out, tensors), (ref, ref_tensors)):
        for path in d.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                into.update({k: f.get_tensor(k) for k in f.keys()})
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".qweight")}
    assert quantized == {f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")}
    assert not any(n.endswith(".weight") and n.rsplit(".", 1)[0] in quantized for n in tensors)
    assert tensors["transformer.h.0.attn.c_attn.bias"].dtype == torch.float16  # c_attn keeps its bias
    assert tensors["lm_head.weight"].dtype == torch.float16  # wte / lm_head are not quantized
    c_attn = GPTQTensors(*(tensors[f"transformer.h.0.attn.c_attn.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")))
    assert c_attn.qweight.shape == (128 * bits // 32, 3 * 128) and c_attn.scales.shape == (2, 384)
    assert torch.equal(dequantize(c_attn, bits), ref_tensors["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(ref_tensors["lm_head.weight"], tensors["lm_head.weight"].float())


# -- clear errors (no engine) ----------------------------------------------------------
def test_gptq_bits_the_cpu_cannot_run_are_named(gptq_dirs) -> None:
    from qwen_vllm.checkpoints.fixtures import gptq_quantize_config, qwen_config
    from qwen_vllm.plugin.quantization import check_engine_settings, check_gptq

    _, _, int8 = gptq_dirs
    check_engine_settings(int8)  # Int8 runs on CPU (qwen-vllm's kernel)
    with pytest.raises(QwenQuantizationError, match=r"GPTQ Int3 checkpoints do not run on CPU \(4-bit and 8-bit do\)"):
        check_gptq(gptq_quantize_config(3, 128), qwen_config(4096, 32, 32, 11008), tensor_parallel_size=1, on_cpu=True, where="3-bit")


@pytest.fixture
def avx2_only(monkeypatch):
    """The checks as they run on an AVX2-only CPU, whatever this one is."""
    from qwen_vllm.plugin import quantization
    from qwen_vllm.runtime.cpu import CpuCaps

    monkeypatch.setattr(quantization, "cpu_caps", lambda: CpuCaps(x86=True, avx512=False, amx=False))


@pytest.mark.parametrize("kv", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_on_avx2_names_the_hardware(random_model, kv, avx2_only) -> None:
    from qwen_vllm.plugin.quantization import check_engine_settings

    with pytest.raises(QwenQuantizationError, match=rf"kv_cache_dtype='{kv}'.*AVX-512 or AMX.*AVX2 only"):
        check_engine_settings(random_model, kv_cache_dtype=kv)


def test_kv_cache_dtype_the_cpu_backend_lacks(random_model, avx2_only) -> None:
    """(An FP8 KV cache engine on a CPU that holds one: test_wrapper's script test.)"""
    from qwen_vllm.plugin.quantization import check_engine_settings
    from qwen_vllm.wrapper.chat import vLLMWrapper

    with pytest.raises(QwenQuantizationError, match=r"'bfloat16' is not supported by vLLM's CPU.*'auto', 'fp8'"):
        check_engine_settings(random_model, kv_cache_dtype="bfloat16")
    check_engine_settings(random_model, kv_cache_dtype="auto")
    with pytest.raises(QwenQuantizationError, match="kv_cache_dtype='fp8'.*this CPU has AVX2 only"):
        vLLMWrapper(str(random_model), kv_cache_dtype="fp8")


def test_tensor_parallel_split_must_keep_whole_groups() -> None:
    """Qwen-1.8B-Chat-Int4 (MLP 5504, group 128) at TP=2: 2752 inputs per rank
    is 21.5 groups -- the "input size is not aligned" failure Qwen's CI hit."""
    from qwen_vllm.checkpoints.fixtures import gptq_quantize_config, qwen_config
    from qwen_vllm.plugin.quantization import check_gptq

    qwen_1_8b = qwen_config(2048, 24, 16, 5504)
    qwen_7b = qwen_config(4096, 32, 32, 11008)
    q = gptq_quantize_config(4, 128)
    with pytest.raises(QwenQuantizationError, match=r"mlp\.c_proj: tensor_parallel_size=2 gives each rank 2752 inputs"):
        check_gptq(q, qwen_1_8b, tensor_parallel_size=2, on_cpu=True, where="Qwen-1.8B-Chat-Int4")
    check_gptq(q, qwen_1_8b, tensor_parallel_size=1, on_cpu=True, where="Qwen-1.8B-Chat-Int4")
    check_gptq(q, qwen_7b, tensor_parallel_size=2, on_cpu=True, where="Qwen-7B-Chat-Int4")
    with pytest.raises(QwenQuantizationError, match="group_size=16"):
        check_gptq(gptq_quantize_config(4, 16), qwen_7b, tensor_parallel_size=1, on_cpu=True, where="x")
    check_gptq(gptq_quantize_config(8, 128), qwen_7b, tensor_parallel_size=2, on_cpu=False, where="GPU")


@pytest.fixture(scope="module")
def legacy_int4(gptq_dirs, fixtures_root):
    """The Int4 fixture with GPTQ declared only in quantize_config.json (as
    auto-gptq's own saves are)."""
    import shutil

    int4, _, _ = gptq_dirs
    legacy = fixtures_root / "gptq-int4-legacy"
    if not legacy.exists():
        shutil.copytree(int4, legacy)
        cfg = json.loads((legacy / "config.json").read_text())
        del cfg["quantization_config"]
        (legacy / "config.json").write_text(json.dumps(cfg))
    return legacy


def test_quantize_config_json_alone_selects_gptq(gptq_dirs, legacy_int4) -> None:
    """auto-gptq's own saves carry only quantize_config.json, which vLLM reads
    only when told quantization="gptq": the wrapper and the worker tell it."""
    from qwen_vllm.plugin.quantization import engine_quantization

    int4, _, _ = gptq_dirs
    legacy = legacy_int4
    assert engine_quantization(int4, None) is None  # config.json declares it: vLLM auto-detects
    assert engine_quantization(legacy, None) == "gptq"
    assert engine_quantization(legacy, "gptq_marlin") == "gptq_marlin"


def test_module_names_reach_vllms_quantization_config() -> None:
    """vLLM's GPTQ config, given the checkpoint's module list through our
    mapper, quantizes exactly the fused layers built from Qwen's linears."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.utils.gptq_utils import (
        is_layer_gptq_quantized,
    )

    from qwen_vllm.plugin.model import QWenLMHeadModel

    cfg = AutoGPTQConfig.from_config({"bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    cfg.modules_in_block_to_quantize = [f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")]
    cfg.apply_vllm_mapper(QWenLMHeadModel.hf_to_vllm_mapper.get_rename_mapper())
    fused = QWenLMHeadModel.packed_modules_mapping
    quantized = lambda prefix: is_layer_gptq_quantized(prefix, cfg.modules_in_block_to_quantize, fused)  # noqa: E731
    assert quantized("model.layers.0.self_attn.qkv_proj") and quantized("model.layers.0.self_attn.o_proj")
    assert quantized("model.layers.0.mlp.gate_up_proj")
    assert not quantized("model.layers.0.mlp.down_proj")  # left out of the list above
    assert not quantized("model.layers.1.self_attn.qkv_proj") and not quantized("lm_head")


# -- real engines --------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_ids(qwen_tokenizer) -> list[list[int]]:
    return [qwen_tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(gptq_dirs, fixtures_root):
    """transformers' Qwen2 in float32 on the exact weights the Int4 fixture
    encodes, as a scorer (ids -> log-probs at every position)."""
    from qwen_vllm.checkpoints.convert import convert_to_qwen2

    _, ref, _ = gptq_dirs
    return transformers_scorer(convert_to_qwen2(ref, fixtures_root / "gptq-int4-reference-qwen2"))


def with_int8_vocab(model: Path, reference: Path, out: Path) -> Path:
    """A copy of the float ``reference`` whose lm_head and embedding are the
    GPTQ ``model``'s (float16 in the checkpoint) rounded as the int8 lm_head
    and the int8 embedding hold them."""
    import shutil

    from safetensors.torch import load_file, save_file

    def file_of(root: Path, name: str) -> Path:
        return root / json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][name]

    shutil.copytree(reference, out, dirs_exist_ok=True)
    for name in ("lm_head.weight", "transformer.wte.weight"):
        tensors = load_file(file_of(out, name))
        tensors[name] = rounded_rows(load_file(file_of(model, name))[name].float())
        save_file(tensors, file_of(out, name), metadata={"format": "pt"})
    return out


def int8_head_input(lm_head: list[list]):
    """How the engine's int8 lm_head (``vocab_layers``) sees the hidden
    state: rounded per token where it runs on vLLM's oneDNN W8A8 GEMM, as it is
    on PyTorch's weight-only kernel (test_lm_head.py)."""
    return rounded_tokens if lm_head[0][2] is not None else None


def vocab_layers(llm) -> dict[str, list[list]]:
    """Each rank's lm_head and embedding weights as test_lm_head describes
    them, asked of the engine's workers."""
    return {"lm_head": llm.apply_model(lm_head_weight), "embedding": llm.apply_model(embedding_weight)}


@pytest.fixture(scope="module")
def model_rpc():
    """vLLM hands a function to its engine processes (apply_model) only when
    allowed to pickle; for the engines of this module only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        yield


def qlora_for(model: Path, reference: Path, root: Path):
    """(a Q-LoRA adapter for the GPTQ fixture ``model``, the Qwen2 copy of its
    float ``reference`` weights with that adapter merged in float32)."""
    from qwen_vllm.checkpoints.convert import convert_to_qwen2
    from qwen_vllm.checkpoints.lora import make_adapter, merge_lora

    adapter = make_adapter(model, root / f"{model.name}-qlora", seed=3)
    merged = merge_lora(reference, adapter, root / f"{model.name}-reference-qlora", torch.float32)
    return adapter, convert_to_qwen2(merged, root / f"{model.name}-reference-qlora-qwen2")


@pytest.fixture(scope="module")
def qlora(gptq_dirs, fixtures_root):
    int4, ref, _ = gptq_dirs
    adapter, merged = qlora_for(int4, ref, fixtures_root)
    return adapter, transformers_scorer(merged)


@pytest.fixture(scope="module")
def int4_tp1(gptq_dirs, prompt_ids, qlora, model_rpc):
    """The wrapper on the Int4 fixture, no quantization= (auto-detected), LoRA on:
    ((quantization, dtype, KV-cache dtype), outputs on the prompts, a chat reply,
    outputs with the Q-LoRA adapter). The engine is shut down before the TP=2 one starts."""
    from qwen_vllm.wrapper.chat import vLLMWrapper

    int4, _, _ = gptq_dirs
    wrapper = vLLMWrapper(
        str(int4), dtype="float16", kv_cache_dtype="auto", enforce_eager=True, max_model_len=1024, enable_lora=True
    )
    try:
        config = wrapper.llm.llm_engine.vllm_config
        settings = (config.model_config.quantization, config.model_config.dtype, config.cache_config.cache_dtype)
        base = run(wrapper.llm, prompt_ids, NEW_TOKENS)
        adapted = run(wrapper.llm, prompt_ids, NEW_TOKENS, lora=wrapper.lora_request(qlora[0]))
        return settings, base, wrapper.chat("Hi", max_new_tokens=8)[0], adapted, vocab_layers(wrapper.llm)
    finally:
        wrapper.llm.llm_engine.engine_core.shutdown()


# Engine start-up on the shared 2-core machine has taken 13 minutes under load.
@pytest.mark.timeout(1800)
def test_int4_auto_detected_and_equals_dequantized_reference(int4_tp1, reference) -> None:
    settings, got, reply, _, vocab = int4_tp1
    assert settings == ("auto_gptq", torch.float16, "auto")
    assert vocab["lm_head"] == [["torch.float16", [0], None]]  # one copy: vLLM's packed one (plugin/lm_head.py)
    assert vocab["embedding"] == [["torch.float16", [151936, 128], None, False]]  # one copy: the weight
    # LoRA on, no adapter asked for: the base model. Teacher-forced: the bf16 int4pack kernel
    # may resolve a near-tie of the random weights the other way (seen once in 5 runs).
    check_teacher_forced_greedy(reference, got, CPU_LOGPROB_TOL)
    assert isinstance(reply, str) and reply  # chat() works on the quantized engine


@pytest.mark.timeout(1800)
def test_qlora_adapter_equals_the_merged_dequantized_reference(int4_tp1, qlora) -> None:
    """Q-LoRA cannot be merged into Int4 weights (Qwen's README): served
    unmerged on the Int4 model it equals the float weights with it merged."""
    _, base, _, adapted, _ = int4_tp1
    check_teacher_forced_greedy(qlora[1], adapted, CPU_LOGPROB_TOL)
    assert [r["tokens"] for r in adapted] != [r["tokens"] for r in base]  # the adapter changes the words


@pytest.fixture(scope="module")
def int8_reference(gptq_dirs, fixtures_root) -> Path:
    """The Int8 fixture's float weights, its lm_head and embedding as the int8
    lm_head and embedding hold them."""
    _, _, int8 = gptq_dirs
    return with_int8_vocab(int8, fixtures_root / "gptq-int8-reference", fixtures_root / "gptq-int8-reference-int8-vocab")


@pytest.fixture(scope="module")
def int8_qlora(gptq_dirs, int8_reference, fixtures_root):
    _, _, int8 = gptq_dirs
    return qlora_for(int8, int8_reference, fixtures_root)


@pytest.fixture(scope="module")
def int8_tp2(gptq_dirs, prompt_ids, int8_qlora, int4_tp1, model_rpc) -> dict:
    """The wrapper at TP=2 on the Int8 fixture (a base model), LoRA on, the
    lm_head int8: its outputs with and without a Q-LoRA adapter, and what it
    does as a base model, and each rank's embedding. Starts after the TP=1
    engine is gone (``int4_tp1``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qwen_vllm.plugin.lm_head import INT8_EMBEDDING_KEY, INT8_KEY
    from qwen_vllm.plugin.tokenizer import IM_END_ID
    from qwen_vllm.wrapper.chat import QwenChatFormatError, vLLMWrapper

    _, _, int8 = gptq_dirs
    wrapper = vLLMWrapper(
        str(int8), tensor_parallel_size=2, dtype="float16", enforce_eager=True, max_model_len=1024, enable_lora=True,
        additional_config={INT8_KEY: True, INT8_EMBEDDING_KEY: True},
    )  # fmt: skip
    try:
        with pytest.raises(QwenChatFormatError, match="use generate") as chat_error:
            wrapper.chat("Hi")
        # Only <|im_end|> may be sampled: a chat checkpoint stops at the first one, a base one does not.
        only_im_end = SamplingParams(max_tokens=3, temperature=0.0, allowed_token_ids=[IM_END_ID])
        [forced] = wrapper.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0])], only_im_end, use_tqdm=False)
        return {
            "quantization": wrapper.llm.llm_engine.vllm_config.model_config.quantization,
            "base": run(wrapper.llm, prompt_ids, NEW_TOKENS),
            "adapted": run(wrapper.llm, prompt_ids, NEW_TOKENS, lora=wrapper.lora_request(int8_qlora[0])),
            "chat_error": str(chat_error.value),
            "forced_im_end": list(forced.outputs[0].token_ids),
            "text": wrapper.generate("Hello", do_sample=False, max_new_tokens=4),
            **vocab_layers(wrapper.llm),
        }
    finally:
        wrapper.llm.llm_engine.engine_core.shutdown()


@pytest.mark.timeout(1800)
def test_int8_tensor_parallel_2_equals_dequantized_reference(int8_tp2, int8_qlora, int8_reference, fixtures_root) -> None:
    """GPTQ Int8 on CPU (qwen-vllm's kernel), at TP=2, lm_head in int8 rows: the
    base model and a Q-LoRA adapter served unmerged on it equal transformers on
    the float weights the fixture encodes, the lm_head and its input rounded as
    the int8 GEMM rounds them, the embedding rows as its int8 rows hold them
    (each rank's slice of the weights, scales, fused LoRA and vocabulary)."""
    from qwen_vllm.checkpoints.convert import convert_to_qwen2

    assert int8_tp2["quantization"] == "auto_gptq"
    # Each rank: half the vocabulary in int8, in vLLM's oneDNN handler (or as int8 rows without oneDNN).
    assert int8_tp2["lm_head"] in ([["torch.int8", [0], 151936 // 2]] * 2, [["torch.int8", [151936 // 2, 128], None]] * 2)
    assert int8_tp2["embedding"] == [["torch.int8", [151936 // 2, 128], "torch.float32", False]] * 2
    head_input = int8_head_input(int8_tp2["lm_head"])
    base = convert_to_qwen2(int8_reference, fixtures_root / "gptq-int8-reference-qwen2")
    check_teacher_forced_greedy(transformers_scorer(base, head_input), int8_tp2["base"], CPU_LOGPROB_TOL)
    check_teacher_forced_greedy(transformers_scorer(int8_qlora[1], head_input), int8_tp2["adapted"], CPU_LOGPROB_TOL)
    assert [r["tokens"] for r in int8_tp2["adapted"]] != [r["tokens"] for r in int8_tp2["base"]]


def test_base_model_generates_and_refuses_chat(int8_tp2) -> None:
    """A base checkpoint (generation_config chat_format "raw"): chat() says to
    use generate(), which works; <|im_end|> is an ordinary token, not a stop.
    test_wrapper.py checks the chat checkpoint's side."""
    from qwen_vllm.plugin.tokenizer import IM_END_ID

    assert "use generate" in int8_tp2["chat_error"]
    assert int8_tp2["forced_im_end"] == [IM_END_ID] * 3
    assert isinstance(int8_tp2["text"], str) and int8_tp2["text"]


# -- flags reach vLLM from the worker and the stack; vLLM's own entry point -------------
# After the engines: vLLM's model inspection is cached by then, so building an
# engine config (no engine) takes a fraction of a second.
def _worker_engine_config(argv: list[str]):
    """What ``qwen-vllm worker ARGV`` hands vLLM: its parsed and checked args
    and the engine config vLLM's API server builds from them (run_server:
    AsyncEngineArgs.from_cli_args(args).create_engine_config())."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from qwen_vllm import worker_launch

    args = worker_launch.resolve_args(worker_launch.build_parser().parse_args(argv))
    return args, AsyncEngineArgs.from_cli_args(args).create_engine_config()


def _stack(argv: list[str]):
    import argparse

    from qwen_vllm.serving import stack

    parser = argparse.ArgumentParser()
    stack.add_arguments(parser)
    return stack, parser.parse_args(argv)


def test_stack_engine_flags_reach_each_workers_vllm_config(gptq_dirs, tmp_path) -> None:
    """``qwen-vllm stack --model INT4 -- --dtype float16 ...``: the worker's
    command line, parsed by the worker, gives vLLM an engine config with GPTQ
    auto-detected (no --quantization), float16 and the KV-cache dtype."""
    int4, _, _ = gptq_dirs
    stack, args = _stack(["--model", str(int4), "--log-dir", str(tmp_path), "--",
                          "--dtype", "float16", "--kv-cache-dtype", "auto", "--max-model-len", "512"])  # fmt: skip
    st = stack.Stack(args)
    try:
        st.check_worker_args()
        (worker,) = st.workers
        wargs, cfg = _worker_engine_config(worker.cmd[3:])
    finally:
        st.client.close()
    assert wargs.model == str(int4) and wargs.quantization is None
    assert cfg.model_config.quantization == "auto_gptq" and cfg.model_config.dtype == torch.float16
    assert cfg.cache_config.cache_dtype == "auto" and cfg.model_config.max_model_len == 512


def test_worker_selects_gptq_for_quantize_config_json_alone(legacy_int4) -> None:
    args, cfg = _worker_engine_config(["--model-path", str(legacy_int4), "--dtype", "float16", "--max-model-len", "512"])
    assert args.quantization == "gptq" and cfg.model_config.quantization == "gptq"
    assert cfg.model_config.dtype == torch.float16
    # An explicit choice is kept (and vLLM's GPTQ override picks its CPU-capable method).
    _, cfg = _worker_engine_config(["--model-path", str(legacy_int4), "--quantization", "gptq_marlin",
                                    "--dtype", "bfloat16", "--max-model-len", "512"])  # fmt: skip
    assert cfg.model_config.quantization in ("gptq_marlin", "auto_gptq") and cfg.model_config.dtype == torch.bfloat16


def test_worker_and_stack_refuse_what_the_cpu_cannot_run_before_starting(gptq_dirs, random_model, tmp_path, capsys, avx2_only, monkeypatch) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from qwen_vllm import worker_launch

    int4, _, _ = gptq_dirs
    parse = worker_launch.build_parser().parse_args
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)  # an engine set up earlier may have set it
    assert worker_launch.run(parse(["--model-path", str(random_model), "--tensor-parallel-size", str(len(os.sched_getaffinity(0)) * 2)])) == 2
    assert "needs at least that many CPU cores" in capsys.readouterr().err
    too_thin = ["--dtype", "float16", "--tensor-parallel-size", "8"]  # 384 / 8 = 48 qkv outputs per rank
    assert worker_launch.run(parse(["--model-path", str(int4), *too_thin])) == 2
    assert re.search(r"qwen-vllm worker: error: .*48 per rank \(tensor_parallel_size=8\); the CPU GPTQ kernels need both a multiple of 32", capsys.readouterr().err)
    # The flag itself reaches vLLM's engine args ...
    kv_args = parse(["--model", str(random_model), "--kv-cache-dtype", "fp8"])
    assert AsyncEngineArgs.from_cli_args(kv_args).kv_cache_dtype == "fp8"
    # ... and on an AVX2-only CPU the worker says it cannot hold it instead of starting.
    assert worker_launch.run(kv_args) == 2
    assert "kv_cache_dtype='fp8' (FP8 KV cache) needs an x86 CPU with AVX-512 or AMX" in capsys.readouterr().err
    stack, args = _stack(["--model", str(int4), "--log-dir", str(tmp_path), "--", *too_thin])
    assert stack.run(args) == 2
    out = capsys.readouterr()
    assert "qwen-vllm stack: error:" in out.err and "multiple of 32" in out.err
    assert "controller" not in out.out and not list(tmp_path.iterdir())  # nothing was started


def test_vllm_own_entry_point_gets_the_same_errors(gptq_dirs, legacy_int4, random_model, avx2_only) -> None:
    """vllm.LLM directly (as vLLM's API server would build it): the plugin's
    config hook raises while vLLM builds its config, before any engine process
    starts (pydantic reports it as a ValueError of VllmConfig)."""
    from vllm import LLM

    with pytest.raises(ValueError, match=r"declares GPTQ only in quantize_config.json.*pass --quantization gptq"):
        LLM(str(legacy_int4), dtype="float16", enforce_eager=True, max_model_len=512)
    with pytest.raises(ValueError, match="FP8 KV cache.*AVX-512 or AMX"):
        LLM(str(random_model), kv_cache_dtype="fp8", enforce_eager=True, max_model_len=512)


def test_gpu_checks_capability_and_group_size() -> None:
    """On a GPU: Marlin needs compute capability 7.5 and groups of -1/32/64/128
    (vLLM would accept auto_gptq from 6.0 and fail inside the engine)."""
    from qwen_vllm.checkpoints.fixtures import gptq_quantize_config, qwen_config
    from qwen_vllm.plugin.quantization import check_gptq

    cfg = qwen_config(4096, 32, 32, 11008)
    check_gptq(gptq_quantize_config(8, 128), cfg, tensor_parallel_size=2, on_cpu=False, where="7B", capability=(8, 0))
    with pytest.raises(QwenQuantizationError, match=r"compute capability 7\.5 or newer.*this GPU has 7\.0"):
        check_gptq(gptq_quantize_config(4, 128), cfg, tensor_parallel_size=1, on_cpu=False, where="7B", capability=(7, 0))
    with pytest.raises(QwenQuantizationError, match=r"group_size=16; vLLM's GPU kernels"):
        check_gptq(gptq_quantize_config(4, 16), cfg, tensor_parallel_size=1, on_cpu=False, where="7B", capability=(9, 0))


def test_docs_tp_table_is_check_gptqs() -> None:
    from pathlib import Path

    from qwen_vllm.bench.shapes import SIZES
    from qwen_vllm.plugin.quantization import gptq_tp_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "quantization.md").read_text(encoding="utf-8")
    table = doc.split("<!-- gptq-tp-table -->\n", 1)[1].split("\n<!-- /gptq-tp-table -->", 1)[0]
    assert table == gptq_tp_table(SIZES)
    assert "| 14B | GPU | yes | no |" in table  # 13696 / 2 = 53.5 groups of 128
