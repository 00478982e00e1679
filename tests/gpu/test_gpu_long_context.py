"""Qwen's dynamic NTK + LogN on CUDA vs the plain-torch reference, on every
execution path vLLM 0.32 can take for the same requests.

The CPU suite (tests/test_long_context.py, whose fixture, reference and
request runner are reused here) proves the maths on vLLM's CPU backend. On a
GPU the per-request positions travel differently:

* Model Runner V1 (vllm/v1/worker/gpu_model_runner.py) keeps each request's
  M-RoPE positions from ``get_mrope_input_positions`` and continues decode
  positions from its delta; Model Runner V2 (vllm/v1/worker/gpu/mm/rope.py,
  the default on CUDA in 0.32: VllmConfig.use_v2_model_runner) stages them in
  a GPU buffer and computes decode positions in a Triton kernel.
* eager vs torch.compile + CUDA graphs: the rotary/LogN module is traced and
  replayed from captured graphs, positions from persistent buffers.
* float32 vs bfloat16: the rotary cache, LogN table, activations and KV cache
  in the model dtype.

Each of the 2 x 2 x 2 engines runs the CPU suite's mixed batch (every alpha
bucket in one batch, a decode crossing a bucket boundary). A ninth and tenth
engine (V1 / V2) get so few KV blocks that requests are preempted and resumed
mid-decode: the alpha must stay the prompt's.

Engines are started one at a time, run everything their tests need, and are
shut down before the next (at most one on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_long_context import (  # noqa: F401 (model_dir and reference are fixtures)
    CONTROL_MIN,
    CROSSING,
    MAX_MODEL_LEN,
    MIXED,
    NEW_TOKENS,
    SEQ_LENGTH,
    QwenReference,
    max_delta,
    model_dir,
    random_prompt,
    reference,
    run,
    scored,
)

# |delta logprob| of vLLM vs the float32 reference, per engine dtype.
#
# float32: the CPU suite measures ~3e-5 (its TOL is 1e-4). On CUDA the same
# fp32 maths runs in other kernels (cuBLAS, Triton attention with its
# approximate exp2, fused RMSNorm and rotary), which sum in other orders:
# 5e-4, still 20x below the CPU suite's CONTROL_MIN and >3000x below what a
# wrong alpha moves a logprob (1.6 to 11 nats on MIXED). TF32 stays off:
# vLLM's GPU worker keeps torch at "highest" fp32 matmul precision
# (VLLM_FLOAT32_MATMUL_PRECISION, vllm/v1/worker/gpu_worker.py), and
# TRITON_F32_DEFAULT=ieee stops Triton's tl.dot (vLLM's Triton attention, the
# backend CUDA picks for float32) from rounding fp32 inputs to TF32 (~1e-3).
#
# bfloat16: 8 significant bits in every activation, the rotary cache, the LogN
# factor and the KV cache. The reference run under CPU bfloat16 autocast on
# these prompts differs from fp32 by at most 0.07 nats per prompt on average
# and 0.63 at worst (on random prompt tokens of logprob below -15). Bounds: mean
# 0.15 per sequence (2x the emulation, for vLLM's bf16 KV cache and rotary),
# max 1.5. What a wrong alpha moves the per-prompt mean by (0.39 nats for the
# 33-token prompt, 0.88 to 2.3 for the longer ones) stays above twice the
# mean bound: asserted per prompt, so the bf16 bound still catches a wrong alpha.
FP32_TOL = 5e-4
BF16_MEAN_TOL = 0.15
BF16_MAX_TOL = 1.5
FP32_ENV = {"TRITON_F32_DEFAULT": "ieee"}
CAPTURE_MAX = 16  # CUDA graphs up to batch 16: MIXED's 8 decodes replay a captured graph


@dataclass(frozen=True)
class Variant:
    v2_runner: bool
    eager: bool
    dtype: str

    @property
    def id(self) -> str:
        return f"{'mrv2' if self.v2_runner else 'mrv1'}-{'eager' if self.eager else 'cudagraph'}-{self.dtype}"

    def env(self) -> dict[str, str]:
        env = {"VLLM_USE_V2_MODEL_RUNNER": "1" if self.v2_runner else "0"}
        return {**env, **FP32_ENV} if self.dtype == "float32" else env

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(dtype=self.dtype, max_model_len=MAX_MODEL_LEN, enforce_eager=self.eager)
        if not self.eager:
            kwargs["compilation_config"] = {"max_cudagraph_capture_size": CAPTURE_MAX}
        return kwargs


VARIANTS = [Variant(v2, eager, dtype) for v2 in (False, True) for eager in (True, False) for dtype in ("float32", "bfloat16")]


def mean_delta(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def check_teacher_forced(reference: QwenReference, result: dict, dtype: str, alpha: int | None = None) -> None:
    """vLLM's sampled-token (and, when asked for, prompt) logprobs vs the
    reference scoring vLLM's own sequence with ``alpha`` (default: the
    prompt's), and each greedy token the reference's argmax up to the dtype's
    tolerance (a near-tie may flip, after which the sequences differ but stay
    comparable token by token)."""
    prompt, tokens = result["prompt"], result["tokens"]
    alpha = alpha or reference.get_ntk_alpha(len(prompt))
    lp = reference.logprobs(prompt + tokens, alpha)
    pairs = [(result["lp"], scored(lp, prompt + tokens, len(prompt)))]
    if "prompt_lp" in result:
        pairs.append((result["prompt_lp"], scored(lp, prompt, 1)))
    tie = FP32_TOL if dtype == "float32" else BF16_MAX_TOL
    for got, want in pairs:
        if dtype == "float32":
            assert max_delta(got, want) <= FP32_TOL, (len(prompt), max_delta(got, want))
        else:
            assert mean_delta(got, want) <= BF16_MEAN_TOL, (len(prompt), mean_delta(got, want))
            assert max_delta(got, want) <= BF16_MAX_TOL, (len(prompt), max_delta(got, want))
    rows = lp[len(prompt) - 1 : len(prompt) + len(tokens) - 1]
    chosen = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.all(rows.max(-1).values - chosen <= 2 * tie), (len(prompt), (rows.max(-1).values - chosen).max())


# -- the 2 x 2 x 2 engines -------------------------------------------------------------
@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.id)
def variant_run(request: pytest.FixtureRequest, model_dir: Path, gpu_engine: Callable[..., Any]) -> dict:
    """One engine of the variant: what vLLM resolved, and MIXED's outputs."""
    from vllm.config import CompilationMode, CUDAGraphMode

    variant: Variant = request.param
    with gpu_engine(model_dir, env=variant.env(), **variant.engine_kwargs()) as llm:
        cfg = llm.llm_engine.vllm_config
        return {
            "variant": variant,
            "v2_runner": cfg.use_v2_model_runner,
            "cudagraphs": cfg.compilation_config.cudagraph_mode != CUDAGraphMode.NONE,
            "compiled": cfg.compilation_config.mode == CompilationMode.VLLM_COMPILE,
            "dtype": cfg.model_config.dtype,
            "uses_mrope": cfg.model_config.uses_mrope,
            "prefix_caching": cfg.cache_config.enable_prefix_caching,
            "mixed": run(llm, MIXED),
        }


def test_engine_runs_the_variant_asked_for(variant_run: dict) -> None:
    """The knobs took effect: otherwise every other test of the variant
    would silently re-test vLLM's default path."""
    variant: Variant = variant_run["variant"]
    assert variant_run["v2_runner"] is variant.v2_runner
    assert variant_run["cudagraphs"] is (not variant.eager)
    assert variant_run["compiled"] is (not variant.eager)
    assert variant_run["dtype"] == getattr(torch, variant.dtype)
    assert variant_run["uses_mrope"] is True  # per-request positions: the path under test
    assert variant_run["prefix_caching"] is False


def test_mixed_buckets_in_one_batch_match_reference(variant_run: dict, reference: QwenReference) -> None:
    """Every alpha bucket (1, 3, 7, 15, 31) in one continuous batch, chunked
    by the GPU scheduler as it likes, equals Qwen's maths request by request."""
    dtype = variant_run["variant"].dtype
    results = variant_run["mixed"]
    assert {reference.get_ntk_alpha(len(r["prompt"])) for r in results} == {1, 3, 7, 15, 31}
    for result in results:
        check_teacher_forced(reference, result, dtype)
    if dtype == "bfloat16":  # the loose bound still tells a wrong alpha apart
        for result in results:
            prompt = result["prompt"]
            if len(prompt) <= SEQ_LENGTH:
                continue
            alpha = reference.get_ntk_alpha(len(prompt))
            right = scored(reference.logprobs(prompt, alpha), prompt, 1)
            for wrong in (2 * alpha + 1, 1):
                moved = mean_delta(right, scored(reference.logprobs(prompt, wrong, logn=wrong != 1), prompt, 1))
                assert moved >= 2 * BF16_MEAN_TOL, (len(prompt), wrong, moved)


def test_decode_across_bucket_boundary_keeps_prefill_alpha(variant_run: dict, reference: QwenReference) -> None:
    """The 60-token prompt (alpha 3) decodes past 64 tokens (alpha 7's range):
    decode positions come from the runner's delta (V1: CPU, V2: a Triton
    kernel; replayed from CUDA graphs in the compiled variants) and must keep
    alpha 3, as Qwen's cached decode does."""
    dtype = variant_run["variant"].dtype
    result = next(r for r in variant_run["mixed"] if len(r["prompt"]) == CROSSING)
    prompt, tokens = result["prompt"], result["tokens"]
    assert reference.get_ntk_alpha(CROSSING) == 3 and reference.get_ntk_alpha(CROSSING + NEW_TOKENS) == 7
    check_teacher_forced(reference, result, dtype, alpha=3)
    # Negative control: re-bucketing at decode moves these logprobs by nats.
    full = prompt + tokens
    crossed = [j for j in range(len(tokens)) if len(prompt) + j > 2 * SEQ_LENGTH]
    assert crossed
    rebucketed = []
    for j in crossed:
        n = len(prompt) + j
        rebucketed.append(reference.logprobs(full[:n], reference.get_ntk_alpha(n))[n - 1, full[n]].item())
    got = [result["lp"][j] for j in crossed]
    if dtype == "float32":
        assert max_delta(got, rebucketed) >= CONTROL_MIN
    else:
        assert mean_delta(got, rebucketed) >= 2 * BF16_MEAN_TOL


# -- preemption: resumed requests keep their prompt's alpha ----------------------------------
# 8 prompts of 60 tokens (alpha 3: the bucket ends at 64) each decode 68 more
# (128 tokens: alpha 7's range). The KV cache holds 32 blocks of 16 tokens
# (vLLM keeps one more as its null block): exactly the 8 prompts, and exactly
# MAX_MODEL_LEN, which vLLM's start-up check requires for one request. Every
# request needs a fifth block at its 65th token, so the scheduler preempts
# (recompute) and resumes requests whose prompt + output is past 64 tokens.
PREEMPT_PROMPT = 60
PREEMPT_NEW = 68
PREEMPT_REQUESTS = 8
BLOCK_SIZE = 16
KV_BLOCKS = 33
PREEMPT_PROMPTS = [random_prompt(PREEMPT_PROMPT, seed=1000 + i) for i in range(PREEMPT_REQUESTS)]


def preemptions(llm: Any) -> int:
    """vLLM's cumulative ``vllm:num_preemptions`` counter (all engines)."""
    from vllm.v1.metrics.reader import Counter

    return sum(m.value for m in llm.get_metrics() if isinstance(m, Counter) and m.name == "vllm:num_preemptions")


def greedy_with_logprobs(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Greedy tokens and their logprobs (no prompt logprobs: a preempted
    request's prompt is recomputed, and only the samples are compared)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [
        {
            "prompt": p,
            "tokens": list(o.outputs[0].token_ids),
            "lp": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)],
        }
        for p, o in zip(prompts, outs, strict=True)
    ]


@pytest.fixture(scope="module", params=[False, True], ids=["mrv1", "mrv2"])
def preempted_run(request: pytest.FixtureRequest, model_dir: Path, gpu_engine: Callable[..., Any]) -> dict:
    """The starved engine (fp32, eager) on Model Runner V1 or V2: how many
    preemptions vLLM counted while it served PREEMPT_PROMPTS, and the outputs."""
    v2 = request.param
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1" if v2 else "0", **FP32_ENV}
    with gpu_engine(
        model_dir,
        env=env,
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=KV_BLOCKS,
        disable_log_stats=False,  # vllm.LLM turns stats off by default; the preemption counter needs them
    ) as llm:
        assert llm.llm_engine.vllm_config.use_v2_model_runner is v2
        before = preemptions(llm)
        results = greedy_with_logprobs(llm, PREEMPT_PROMPTS, PREEMPT_NEW)
        return {"preemptions": preemptions(llm) - before, "results": results}


def test_preempted_requests_keep_prefill_alpha(preempted_run: dict, reference: QwenReference) -> None:
    """Requests preempted past the bucket boundary and recomputed on resume
    continue with alpha 3, their prompt's, not alpha 7 (what the length of
    prompt + output at resume would give)."""
    assert reference.get_ntk_alpha(PREEMPT_PROMPT) == 3
    assert reference.get_ntk_alpha(PREEMPT_PROMPT + PREEMPT_NEW) == 7
    assert preempted_run["preemptions"] >= 1, "no request was preempted: the test proves nothing"
    rebucketed_moves = []
    for result in preempted_run["results"]:
        assert len(result["tokens"]) == PREEMPT_NEW
        check_teacher_forced(reference, result, "float32", alpha=3)
        # Negative control: alpha 7 for the whole sequence (a resume that
        # re-bucketed) scores the tokens after the boundary differently.
        seq = result["prompt"] + result["tokens"]
        start = 2 * SEQ_LENGTH + 1
        rebucketed_moves.append(
            max_delta(scored(reference.logprobs(seq, 3), seq, start), scored(reference.logprobs(seq, 7), seq, start))
        )
    assert max(rebucketed_moves) >= CONTROL_MIN
