"""Qwen v1's lm_head and embedding on CPU (qwen_vllm/plugin/lm_head.py), without
an engine: the lm_head held once (vLLM's packed copy only), the opt-in int8 rows
(vLLM's oneDNN W8A8 GEMM, or PyTorch's weight-only kernel where vLLM has no
oneDNN), the opt-in int8 embedding. Engines serve them in test_gptq.py (Int4 at
TP=1: one copy; Int8 at TP=2: int8 lm_head and embedding, each rank its share
of the vocabulary) against references with those weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qwen_vllm.errors import QwenQuantizationError
from qwen_vllm.plugin.lm_head import (
    INT8_EMBEDDING_KEY,
    INT8_KEY,
    QWenEmbeddingMethod,
    QWenLMHeadMethod,
    check_int8_options,
    int8_lm_head_advice,
    int8_wanted,
    quantize_rows,
)
from qwen_vllm.runtime.cpu import CpuCaps


def lm_head_weight(model: torch.nn.Module) -> list:
    """[dtype, shape] of a vLLM model's lm_head weight, and the vocabulary rows
    an int8 oneDNN handler holds (None without one); run in the engine's
    workers by ``LLM.apply_model`` (a module-level function, pickled by name)."""
    handler = getattr(model.lm_head, "int8_handler", None)
    return [str(model.lm_head.weight.dtype), list(model.lm_head.weight.shape), handler and handler.n]


def embedding_weight(model: torch.nn.Module) -> list:
    """[dtype, shape] of a vLLM model's embedding weight, the dtype of its int8
    row scales (None without) and whether vLLM packed a GEMM copy of it, run in
    the workers like :func:`lm_head_weight`."""
    embedding = model.model.embed_tokens
    scale = getattr(embedding, "int8_scale", None)
    return [str(embedding.weight.dtype), list(embedding.weight.shape), scale is not None and str(scale.dtype) or None,
            hasattr(embedding, "cpu_linear")]  # fmt: skip


def rounded_rows(weight: torch.Tensor) -> torch.Tensor:
    """The int8 lm_head's weights, written out independently: per row,
    scale = max|w| / 127, w ~ round(w / scale) * scale."""
    w = weight.double()
    scale = w.abs().max(dim=1, keepdim=True).values / 127
    scale[scale == 0] = 1
    return (torch.round(w / scale) * scale).to(weight.dtype)


def head(weight: torch.Tensor) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    layer.params_dtype = weight.dtype
    return layer


@pytest.mark.parametrize("chunk_rows", [2048, 64], ids=["one-chunk", "chunks-and-a-partial-one"])
def test_quantize_rows_rounds_each_row_to_its_own_grid(chunk_rows: int, monkeypatch) -> None:
    monkeypatch.setattr("qwen_vllm.plugin.lm_head.QUANTIZE_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    w = torch.randn(300, 128) * torch.logspace(-3, 1, 300)[:, None]  # rows of very different sizes
    w[7] = 0  # padded vocabulary rows are zeros
    values, scale = quantize_rows(w)
    assert values.dtype == torch.int8 and values.abs().max() == 127 and scale.shape == (300,)
    assert torch.equal(values[7], torch.zeros(128, dtype=torch.int8))
    assert torch.allclose(values.float() * scale[:, None], rounded_rows(w), rtol=0, atol=1e-6 * w.abs().max().item())
    assert ((values.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_copy_gives_vllms_logits(dtype: torch.dtype) -> None:
    """The default: vLLM's packed lm_head computes the logits and the unpacked
    weight is gone (where vLLM falls back to F.linear, the weight stays)."""
    from vllm import _custom_ops
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
    )

    torch.manual_seed(0)
    w, x = torch.randn(4096, 128, dtype=dtype), torch.randn(3, 128, dtype=dtype)
    vllms, ours = head(w), head(w)
    UnquantizedEmbeddingMethod().process_weights_after_loading(vllms)
    QWenLMHeadMethod().process_weights_after_loading(ours)
    assert vllms.weight.shape == w.shape  # vLLM keeps it beside its packed copy
    # Dropped wherever vLLM packs it (its oneDNN builds; F.linear elsewhere keeps it).
    assert ours.weight.numel() == 0 or (not _custom_ops._supports_onednn and ours.weight.shape == w.shape)
    assert torch.equal(QWenLMHeadMethod().apply(ours, x), UnquantizedEmbeddingMethod().apply(vllms, x))


FREED = """
import json, psutil, torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from qwen_vllm.plugin.lm_head import QWenEmbeddingMethod, QWenLMHeadMethod
rss = lambda: psutil.Process().memory_info().rss
layer = torch.nn.Module()
layer.weight = torch.nn.Parameter(torch.ones(151936, 2048, dtype=torch.bfloat16), requires_grad=False)
before = rss()
{method}().process_weights_after_loading(layer)
print(json.dumps(rss() - before))
"""


def test_one_copy_frees_the_unpacked_weight() -> None:
    """Qwen-1.8B's lm_head (and embedding) shape in bf16, each in a fresh
    process: after vLLM's packing the process holds one more copy, after ours
    (the lm_head's packed copy instead of the weight; the embedding's weight
    alone) none more."""
    weight_bytes = 151936 * 2048 * 2
    grown = {}
    for method in ("UnquantizedEmbeddingMethod", "QWenLMHeadMethod", "QWenEmbeddingMethod"):
        out = subprocess.run([sys.executable, "-c", FREED.format(method=method)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        grown[method] = json.loads(out.stdout.strip().splitlines()[-1])
    assert grown["UnquantizedEmbeddingMethod"] > 0.9 * weight_bytes, grown  # the packed copy beside the weight
    assert grown["QWenLMHeadMethod"] < 0.1 * weight_bytes, grown  # the packed copy instead of it
    assert grown["QWenEmbeddingMethod"] < 0.1 * weight_bytes, grown  # the weight alone


# The peak is the process's own VmHWM, reset once the weight exists: getrusage's
# ru_maxrss also counts the parent's peak (a child started by vfork and exec
# inherits it: under pytest that is the test process's, gigabytes).
PEAK = """
import json, psutil, torch
from qwen_vllm.plugin.lm_head import QWenEmbeddingMethod, QWenLMHeadMethod
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
layer = torch.nn.Module()
layer.weight = torch.nn.Parameter(torch.randn(151936, 2048, dtype=torch.bfloat16), requires_grad=False)
layer.params_dtype = torch.bfloat16
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak restarts at the current resident size
before = psutil.Process().memory_info().rss
{method}(int8=True).process_weights_after_loading(layer)
print(json.dumps(peak() - before))
"""


@pytest.mark.parametrize("method", ["QWenLMHeadMethod", "QWenEmbeddingMethod"])
def test_int8_rounding_peaks_below_a_second_copy(method: str) -> None:
    """Qwen-1.8B's vocabulary shape in bf16, in a fresh process: rounding it to
    int8 rows at load adds at most the int8 rows, the oneDNN handler's packed
    copy of them (lm_head) and a chunk of float32 scratch to the peak. Rounded
    all at once it added three float32 copies (6x the bf16 weight)."""
    weight_bytes = 151936 * 2048 * 2
    out = subprocess.run([sys.executable, "-c", PEAK.format(method=method)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = json.loads(out.stdout.strip().splitlines()[-1])
    assert grown < 1.25 * weight_bytes, grown / 2**30


def rounded_tokens(x: torch.Tensor) -> torch.Tensor:
    """The hidden state as vLLM's W8A8 GEMM sees it, written out independently:
    per token, scale = max|x| / 127, x ~ round(x / scale) * scale."""
    x = x.double()
    scale = x.abs().max(dim=1, keepdim=True).values / 127
    scale[scale == 0] = 1
    return torch.round(x / scale) * scale


@pytest.mark.parametrize("onednn", ["yes", "no-build", "fails"], ids=["vllm-onednn-w8a8", "no-onednn", "onednn-fails"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_equal_the_rounded_weights(dtype: torch.dtype, onednn: str, monkeypatch) -> None:
    """The int8 lm_head computes rounded(x) @ rounded(W).T with vLLM's oneDNN
    int8 GEMM (x rounded per token), or x @ rounded(W).T with PyTorch's
    weight-only kernel where vLLM's build has no oneDNN or its int8 GEMM cannot
    run (both forced here), up to the activation dtype's rounding; the int8
    rows are all it keeps."""
    from vllm import _custom_ops

    from qwen_vllm.runtime.cpu import cpu_caps

    if onednn == "no-build":
        monkeypatch.setattr(_custom_ops, "_supports_onednn", False)
    elif onednn == "fails":
        monkeypatch.setattr(_custom_ops, "create_onednn_scaled_mm", lambda *a: (_ for _ in ()).throw(RuntimeError("no")))
    elif not _custom_ops._supports_onednn:
        pytest.skip("this vLLM build has no oneDNN")
    torch.manual_seed(1)
    w, x = torch.randn(4096, 128).to(dtype) * 0.05, torch.randn(5, 128).to(dtype)
    layer, method = head(w), QWenLMHeadMethod(int8=True)
    method.process_weights_after_loading(layer)
    if onednn == "yes" and layer.int8_handler is None:
        # Measured on AVX-512; elsewhere oneDNN may lack an int8 kernel for this dtype (logged, then the fallback).
        assert not cpu_caps().avx512, "vLLM's oneDNN int8 GEMM did not run on an AVX-512 CPU"
        onednn = "fallback"
    if onednn == "yes":
        assert layer.int8_handler is not None and layer.weight.numel() == 0  # packed by oneDNN
    else:
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == w.shape and layer.int8_scale.dtype == dtype
    got = method.apply(layer, x).float()
    want = (rounded_tokens(x) if onednn == "yes" else x.double()) @ rounded_rows(w.double()).T
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype] * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    if dtype == torch.float32:  # the rounding is visible above fp32's tolerance: the check can fail
        assert (x.double() @ w.double().T - want).abs().max().item() > 100 * tol
    bias = torch.randn(4096).to(dtype)
    assert torch.allclose(method.apply(layer, x, bias).float(), method.apply(layer, x).float() + bias.float(), atol=tol)
    with pytest.raises(NotImplementedError, match="not tied"):
        method.embedding(layer, torch.tensor([1]))


def test_int8_option_is_a_bool_and_cpu_only() -> None:
    assert int8_wanted(None) is False and int8_wanted({}) is False and int8_wanted({INT8_KEY: True}) is True
    with pytest.raises(QwenQuantizationError, match=f"'{INT8_KEY}' must be true or false, not 'yes'"):
        int8_wanted({INT8_KEY: "yes"})
    assert int8_wanted({INT8_KEY: True}, INT8_EMBEDDING_KEY) is False
    with pytest.raises(QwenQuantizationError, match=f"'{INT8_EMBEDDING_KEY}' must be true or false, not 1"):
        int8_wanted({INT8_EMBEDDING_KEY: 1}, INT8_EMBEDDING_KEY)
    check_int8_options({INT8_KEY: True, INT8_EMBEDDING_KEY: True}, on_cpu=True)  # a warning where advised against
    check_int8_options({INT8_KEY: False}, on_cpu=False)
    avx2 = int8_lm_head_advice(CpuCaps(x86=True, avx512=False, amx=False))
    assert avx2 is not None and "slower than the float one" in avx2 and "AVX2 only" in avx2
    assert int8_lm_head_advice(CpuCaps(x86=True, avx512=True, amx=True, bf16=True)) is None
    for key in (INT8_KEY, INT8_EMBEDDING_KEY):
        with pytest.raises(QwenQuantizationError, match=f"'{key}' is a CPU option"):
            check_int8_options({key: True}, on_cpu=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_embedding_looks_up_the_rounded_rows(dtype: torch.dtype) -> None:
    """The int8 embedding holds int8 rows and a float32 scale per row and
    returns, for any ids, the rounded rows in the model's dtype: within half
    a step of its row (max|row| / 254) of the float rows."""
    torch.manual_seed(0)
    w = (torch.randn(1000, 64) * torch.logspace(-2, 1, 1000)[:, None]).to(dtype)
    layer = head(w)
    method = QWenEmbeddingMethod(int8=True)
    method.process_weights_after_loading(layer)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == w.shape
    assert layer.int8_scale.dtype == torch.float32 and layer.int8_scale.shape == (1000, 1)
    ids = torch.tensor([[0, 999, 7], [7, 500, 3]])
    out = method.embedding(layer, ids)
    assert out.dtype == dtype and out.shape == (2, 3, 64)
    assert torch.equal(out, (layer.weight.float() * layer.int8_scale)[ids].to(dtype))  # the rows it holds
    # ... which are the float rows rounded to their own int8 grid (and once more to dtype):
    step, rows = w.float().abs().amax(dim=1, keepdim=True)[ids] / 127, w.float()[ids]
    assert ((out.float() - rows).abs() <= step / 2 * (1 + 1e-6) + rows.abs() * torch.finfo(dtype).eps).all()
    assert (layer.weight.abs().amax(dim=1) == 127).all()  # each row's largest value is a whole step
    with pytest.raises(NotImplementedError, match="not tied"):
        method.apply(layer, torch.ones(1, 64, dtype=dtype))


def test_vllm_own_entry_point_names_a_bad_int8_option(random_model) -> None:
    """vllm.LLM (as ``vllm serve --additional-config``): the config hook
    refuses a non-bool value before any engine process starts."""
    from vllm import LLM

    with pytest.raises(ValueError, match=f"'{INT8_KEY}' must be true or false"):
        LLM(str(random_model), enforce_eager=True, max_model_len=512, additional_config={INT8_KEY: 1})


def test_linear_fallback_keeps_the_weight(monkeypatch) -> None:
    """Where vLLM multiplies with F.linear (no packed copy), the weight stays."""
    from vllm import _custom_ops

    monkeypatch.setattr(_custom_ops, "_supports_onednn", False)
    monkeypatch.setattr("vllm.model_executor.layers.utils.check_cpu_sgl_kernel", lambda *a: False)
    w, x = torch.randn(512, 64), torch.randn(2, 64)
    layer = head(w)
    QWenLMHeadMethod().process_weights_after_loading(layer)
    assert torch.equal(layer.weight, w)
    assert torch.allclose(QWenLMHeadMethod().apply(layer, x), F.linear(x, w))


def test_float_embedding_is_vllms_lookup_without_a_gemm_copy() -> None:
    """The default embedding method on CPU: vLLM's lookup on the weight it
    keeps, and no packed GEMM copy (vLLM's method packs one)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
    )

    torch.manual_seed(0)
    w, ids = torch.randn(512, 64, dtype=torch.bfloat16), torch.tensor([[3, 511], [0, 3]])
    vllms, ours = head(w), head(w)
    UnquantizedEmbeddingMethod().process_weights_after_loading(vllms)
    QWenEmbeddingMethod().process_weights_after_loading(ours)
    assert hasattr(vllms, "cpu_linear") and not hasattr(ours, "cpu_linear")
    assert torch.equal(ours.weight, w)
    assert torch.equal(QWenEmbeddingMethod().embedding(ours, ids), UnquantizedEmbeddingMethod().embedding(vllms, ids))
    with pytest.raises(NotImplementedError, match="not tied"):
        QWenEmbeddingMethod().apply(ours, torch.ones(1, 64, dtype=torch.bfloat16))
