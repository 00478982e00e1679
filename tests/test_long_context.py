"""Qwen's dynamic NTK + LogN attention on vLLM vs a plain-torch Qwen reference.

The reference below is Qwen's ``modeling_qwen.py`` maths for one sequence
(batch 1, fp32, no KV cache), written from Qwen's code and independent of
vLLM and of qwen_vllm: alpha from the prompt length (Qwen's float formula),
``base * alpha ** (d / (d - 2))`` rotary cache, neox rotation, LogN from
Qwen's list. Re-running the whole sequence with the prompt's alpha equals
Qwen's cached decode, which keeps the prefill alpha.

The fixture has ``seq_length=32``, so an engine with ``max_model_len=512``
serves five alpha buckets (1, 3, 7, 15, 31). q/k weights are scaled
(``qk_std=2``) so attention depends strongly on position: the negative
controls move logprobs by several nats, while vLLM stays within ~3e-5 of the
reference.

One engine, at tensor parallel 2 (each rank holds half the heads, so the
rotary and LogN code runs on a head slice; TP=1 is the same code on all
heads), with chunked prefill forced and prefix caching asked for: started
once, it runs every request the tests need, records the outputs and is shut
down.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SEQ_LENGTH = 32
MAX_MODEL_LEN = 512
NEW_TOKENS = 16
TOL = 1e-4  # |delta logprob| vLLM (fp32) vs reference (fp32)
CONTROL_MIN = 1e-2  # a wrong alpha / missing LogN must move logprobs at least this much
# One generate call: every alpha bucket, both sides of the 32 boundary, and a
# 60-token prompt whose decode crosses 64 (bucket alpha 3 -> 7) at step 5.
MIXED_LENGTHS = (20, 32, 33, 48, 60, 100, 200, 400)
CROSSING = 60
CHUNK_TOKENS = 64  # max_num_batched_tokens of the engine: forces chunked prefill


# -- the reference --------------------------------------------------------------
class QwenReference:
    """Qwen v1 forward for one sequence, fp32, from config.json + safetensors."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors.torch import load_file

        self.cfg = json.loads((model_dir / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            self.w.update({k: v.float() for k, v in load_file(str(shard)).items()})
        self.seq_length = self.cfg["seq_length"]
        self.heads = self.cfg["num_attention_heads"]
        self.dim = self.cfg["kv_channels"]
        # QWenAttention.logn_tensor
        self.logn_list = [math.log(i, self.seq_length) if i > self.seq_length else 1 for i in range(1, 32768)]
        self._memo: dict[tuple, torch.Tensor] = {}

    def get_ntk_alpha(self, true_seq_len: int) -> int:
        """QWenModel.get_ntk_alpha, verbatim."""
        context_value = math.log(true_seq_len / self.seq_length, 2) + 1
        ntk_alpha = 2 ** math.ceil(context_value) - 1
        ntk_alpha = max(ntk_alpha, 1)
        return ntk_alpha

    def rotary(self, seqlen: int, ntk_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """RotaryEmbedding.update_rotary_pos_emb_cache (fp32 cos/sin)."""
        dim = self.dim
        base = self.cfg["rotary_emb_base"] * ntk_alpha ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        seq = torch.arange(seqlen)
        freqs = torch.outer(seq.type_as(inv_freq), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["layer_norm_epsilon"]) * weight

    def logprobs(self, ids: list[int], ntk_alpha: float, logn: bool = True) -> torch.Tensor:
        """log_softmax of the logits at every position of ``ids`` (memoised:
        several tests score the same sequences)."""
        key = (tuple(ids), ntk_alpha, logn)
        if key not in self._memo:
            self._memo[key] = self._logprobs(ids, ntk_alpha, logn)
        return self._memo[key]

    def _logprobs(self, ids: list[int], ntk_alpha: float, logn: bool) -> torch.Tensor:
        w, n, h, d = self.w, len(ids), self.heads, self.dim
        x = w["transformer.wte.weight"][torch.tensor(ids)]
        cos, sin = self.rotary(n, ntk_alpha)
        logn_scale = torch.tensor(self.logn_list[:n])[:, None, None] if logn else None
        causal = torch.full((n, n), float("-inf")).triu(1)
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            y = self._rms(x, w[p + "ln_1.weight"])
            qkv = y @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
            q, k, v = (t.reshape(n, h, d) for t in qkv.split(h * d, dim=-1))
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            if logn_scale is not None:
                q = q * logn_scale
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + causal
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, h * d)
            x = x + attn @ w[p + "attn.c_proj.weight"].T
            y = self._rms(x, w[p + "ln_2.weight"])
            x = x + ((y @ w[p + "mlp.w1.weight"].T) * F.silu(y @ w[p + "mlp.w2.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
        x = self._rms(x, w["transformer.ln_f.weight"])
        return (x @ w["lm_head.weight"].T).log_softmax(-1)


def scored(lp: torch.Tensor, ids: list[int], start: int) -> list[float]:
    """Logprob of ids[i] predicted at position i-1, for i >= start."""
    return [lp[i - 1, ids[i]].item() for i in range(start, len(ids))]


def max_delta(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# -- engines -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(fixtures_root: Path) -> Path:
    from qwen_vllm.checkpoints.fixtures import make_model

    return make_model(fixtures_root / "longctx-s32", "random", seq_length=SEQ_LENGTH, qk_std=2.0)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> QwenReference:
    return QwenReference(model_dir)


def random_prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151000, (length,), generator=gen).tolist()


MIXED = [random_prompt(n, seed=n) for n in MIXED_LENGTHS]
SHORT = random_prompt(20, seed=1)  # within seq_length with its reply: plain RoPE
SHARED = random_prompt(130, seed=2)  # > one CPU KV block (128): what prefix caching would reuse
PREFIX_SHORT = SHARED  # bucket alpha 15
PREFIX_LONG = SHARED + random_prompt(200, seed=3)  # bucket alpha 31, same first block


@contextmanager
def engine(model_dir: Path, env: dict[str, str] | None = None, **kwargs):
    from vllm import LLM

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    llm = None
    try:
        llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, seed=0, **kwargs)
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(llm, prompts: list[list[int]], max_tokens: int = NEW_TOKENS, lora=None) -> list[dict]:
    """One generate call: greedy tokens, their logprobs and the prompt logprobs
    (``lora``: a LoRARequest, or one per prompt, None for the base model)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora, use_tqdm=False)
    results = []
    for prompt, out in zip(prompts, outs):
        sample = out.outputs[0]
        results.append(
            {
                "prompt": prompt,
                "prompt_lp": [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])],
                "tokens": list(sample.token_ids),
                "lp": [d[t].logprob for d, t in zip(sample.logprobs, sample.token_ids)],
            }
        )
    return results


def check_teacher_forced_greedy(score, outputs: list[dict], tol: float) -> None:
    """A reference (``score``: ids -> log-probs at every position) scoring the
    engine's own sequences (``run``'s outputs): prompt and sampled-token
    log-probs within ``tol``, each greedy token the reference's argmax up to
    2 * tol (random fixtures have near-ties a low-precision engine may resolve
    the other way, after which the sequences differ yet stay comparable)."""
    worst, lowest = 0.0, 0.0
    for result in outputs:
        prompt, tokens = result["prompt"], result["tokens"]
        lp = score(prompt + tokens)
        worst = max(
            worst,
            max_delta(result["prompt_lp"], scored(lp, prompt, 1)),
            max_delta(result["lp"], scored(lp, prompt + tokens, len(prompt))),
        )
        rows = lp[len(prompt) - 1 : len(prompt) + len(tokens) - 1]
        chosen = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.all(rows.max(-1).values - chosen <= 2 * tol)
        lowest = min(lowest, *scored(lp, prompt, 1))
    assert lowest < -5  # the model is far from uniform: the bound means something
    assert worst <= tol, f"max |logprob diff| {worst} > {tol}"


class CapturedWarnings(logging.Filter):
    """A filter, not a handler: vLLM's logging set-up (dictConfig, run again
    when an engine is built) clears the handlers of every ``vllm.*`` logger."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        return True


@pytest.fixture(scope="module")
def long_ctx(model_dir: Path) -> dict:
    """TP=2 on two cores, max_model_len 512, chunked prefill forced, prefix caching asked for."""
    hook_log = logging.getLogger("vllm.qwen_vllm.plugin.engine_config")
    captured = CapturedWarnings()
    hook_log.addFilter(captured)
    try:
        with engine(
            model_dir,
            env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
            tensor_parallel_size=2,
            max_model_len=MAX_MODEL_LEN,
            max_num_batched_tokens=CHUNK_TOKENS,
            enable_chunked_prefill=True,
            enable_prefix_caching=True,
        ) as llm:
            vllm_config = llm.llm_engine.vllm_config
            return {
                "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
                "max_model_len": vllm_config.model_config.max_model_len,
                "prefix_caching": vllm_config.cache_config.enable_prefix_caching,
                "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
                "warnings": captured.messages,
                "mixed": run(llm, MIXED),
                # Two calls: the long prompt comes after the short one is cached.
                "prefix": run(llm, [PREFIX_SHORT]) + run(llm, [PREFIX_LONG]),
                "short": run(llm, [SHORT], max_tokens=SEQ_LENGTH - len(SHORT)),
            }
    finally:
        hook_log.removeFilter(captured)


# -- pure maths (no engine) ------------------------------------------------------
@pytest.mark.parametrize("seq_length", [2048, 8192, SEQ_LENGTH])
def test_alpha_table_equals_qwen_formula_up_to_32768(seq_length: int) -> None:
    from qwen_vllm.plugin.ntk import LongContextPlan, alpha_bucket, ntk_alpha

    def qwen(true_seq_len: int) -> int:  # QWenModel.get_ntk_alpha
        context_value = math.log(true_seq_len / seq_length, 2) + 1
        return max(2 ** math.ceil(context_value) - 1, 1)

    plan = LongContextPlan.of({"seq_length": seq_length}, 32768)
    for length in range(1, 32769):
        alpha = qwen(length)
        assert ntk_alpha(length, seq_length) == alpha, length
        assert plan.alphas[alpha_bucket(length, seq_length)] == alpha, length
    assert plan.alphas == tuple(sorted({qwen(n) for n in range(1, 32769)}))


def test_rotary_cache_and_logn_table_are_qwens() -> None:
    """Each bucket's rows are Qwen's fp32 cos/sin for its alpha; bucket 0 is
    bit-for-bit vLLM's stock cache; the LogN table is Qwen's list."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from qwen_vllm.plugin.long_context import QwenNTKRotaryEmbedding
    from qwen_vllm.plugin.ntk import LongContextPlan

    head_dim, stride = 64, 256
    plan = LongContextPlan.of({"seq_length": SEQ_LENGTH}, stride)
    assert plan.alphas == (1, 3, 7, 15) and plan.stride == stride
    with set_current_vllm_config(VllmConfig()):
        ours = QwenNTKRotaryEmbedding(plan, head_size=head_dim, base=10000.0, dtype=torch.float32)
        stock = get_rope(head_dim, max_position=stride, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cache = ours.cos_sin_cache
    assert cache.shape == (len(plan.alphas) * stride, head_dim)
    ref = QwenReference.__new__(QwenReference)
    ref.cfg, ref.dim = {"rotary_emb_base": 10000}, head_dim
    for b, alpha in enumerate(plan.alphas):
        cos, sin = ref.rotary(stride, alpha)
        rows = cache[b * stride : (b + 1) * stride]
        assert torch.equal(rows[:, : head_dim // 2], cos[:, 0, : head_dim // 2]), alpha
        assert torch.equal(rows[:, head_dim // 2 :], sin[:, 0, : head_dim // 2]), alpha
    assert torch.equal(cache[:stride], stock.cos_sin_cache)
    logn = [math.log(i, SEQ_LENGTH) if i > SEQ_LENGTH else 1 for i in range(1, stride + 1)]
    assert torch.equal(ours.logn_scale, torch.tensor(logn * len(plan.alphas), dtype=torch.float32))
    assert torch.all(ours.logn_scale[:SEQ_LENGTH] == 1.0)


def test_encoded_positions_fix_alpha_at_prefill() -> None:
    from qwen_vllm.plugin.ntk import LongContextPlan

    plan = LongContextPlan.of({"seq_length": SEQ_LENGTH}, MAX_MODEL_LEN)
    positions, delta = plan.encoded_positions(60)  # bucket 1 (alpha 3)
    assert delta == MAX_MODEL_LEN
    assert positions.shape == (3, 60)
    assert torch.equal(positions[0], torch.arange(60) + MAX_MODEL_LEN)
    assert torch.equal(positions[2], positions[0])
    assert plan.encoded_positions(32)[1] == 0 and plan.encoded_positions(33)[1] == MAX_MODEL_LEN
    assert plan.encoded_positions(MAX_MODEL_LEN)[1] == 4 * MAX_MODEL_LEN


def test_model_runner_v2_resume_keeps_prompt_alpha() -> None:
    """Model Runner V2 (GPU) re-adds a preempted request with prompt + output
    tokens as its prefill: through vLLM's own DefaultModelState.add_request
    (wrapped by the plugin), the positions keep the prompt's alpha bucket.
    (The GPU suite runs the preemption end to end: tests/gpu.)"""
    from torch import nn
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from qwen_vllm.plugin.long_context import keep_prompt_alpha_on_resume
    from qwen_vllm.plugin.model import QWenLMHeadModel
    from qwen_vllm.plugin.ntk import LongContextPlan

    assert keep_prompt_alpha_on_resume() and keep_prompt_alpha_on_resume()  # idempotent
    model = QWenLMHeadModel.__new__(QWenLMHeadModel)
    nn.Module.__init__(model)
    model.long_context = LongContextPlan.of({"seq_length": SEQ_LENGTH}, MAX_MODEL_LEN)
    model.prompt_len_for_positions = None
    seen = []

    class RopeState:  # vLLM's M-RoPE state reduced to the call it makes (it needs CUDA)
        def init_prefill_positions(self, req_idx, model, prefill_token_ids, mm_features) -> None:
            seen.append(model.get_mrope_input_positions(prefill_token_ids, mm_features))

    state = DefaultModelState.__new__(DefaultModelState)
    state.model, state.rope_state, state.prompt_embeds_state = model, RopeState(), None
    prompt, output = list(range(30)), list(range(12))  # 30 tokens: bucket 0; 42: bucket 1

    def request(prefill: list[int]) -> NewRequestData:
        return NewRequestData("r", prompt, [], None, None, ([],), 0, None, prefill_token_ids=prefill)

    state.add_request(0, request(prompt))
    state.add_request(0, request(prompt + output))  # the resume
    (first, first_delta), (resumed, resumed_delta) = seen
    assert first_delta == resumed_delta == 0 and torch.equal(resumed[0], torch.arange(42))
    assert torch.equal(resumed[:, :30], first) and model.prompt_len_for_positions is None
    assert model.long_context.encoded_positions(42)[1] == MAX_MODEL_LEN  # what it would be without


# -- engine configuration (no engine started) --------------------------------------
def engine_config(model_dir: Path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), dtype="float32", enforce_eager=True, **kwargs).create_engine_config()


def rewrite_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_max_model_len_defaults_to_seq_length_and_opts_in(model_dir: Path) -> None:
    default = engine_config(model_dir)
    assert default.model_config.max_model_len == SEQ_LENGTH
    assert not default.model_config.uses_mrope
    assert default.cache_config.enable_prefix_caching  # untouched when unused

    opted = engine_config(model_dir, max_model_len=MAX_MODEL_LEN)
    assert opted.model_config.max_model_len == MAX_MODEL_LEN
    assert opted.model_config.uses_mrope
    assert not opted.cache_config.enable_prefix_caching

    assert engine_config(model_dir, max_model_len=32768).model_config.max_model_len == 32768


def test_max_model_len_beyond_32768_is_a_clear_error(model_dir: Path, monkeypatch) -> None:
    from qwen_vllm.errors import QwenContextError
    from qwen_vllm.wrapper.chat import vLLMWrapper

    with pytest.raises(ValueError, match="32768"):
        engine_config(model_dir, max_model_len=32769)
    # vLLM's escape hatch does not get past Qwen's limit.
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with pytest.raises(ValueError, match=r"max_model_len=40000 is longer than this Qwen checkpoint supports.*32768"):
        engine_config(model_dir, max_model_len=40000)
    # The wrapper refuses before starting an engine, with a typed error.
    with pytest.raises(QwenContextError, match=r"max_model_len=40000 .*32768 tokens \(seq_length=32\)"):
        vLLMWrapper(model_dir, max_model_len=40000)


def worker_engine_config(argv: list[str]):
    """The engine config a ``qwen-vllm worker`` command line builds (no engine started)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from qwen_vllm import worker_launch

    parser = FlexibleArgumentParser(prog="qwen-vllm worker")
    worker_launch.add_arguments(parser)
    args = worker_launch.resolve_args(parser.parse_args(argv))
    return AsyncEngineArgs.from_cli_args(args).create_engine_config()


def test_worker_and_stack_flags_opt_in(model_dir: Path, tmp_path: Path) -> None:
    """``qwen-vllm worker --max-model-len`` (vLLM's flag) and ``qwen-vllm stack
    --max-model-len`` (passed to every worker) reach the engine config."""
    from qwen_vllm.serving import stack

    base = ["--model-path", str(model_dir), "--no-register"]
    default = worker_engine_config(base)
    assert default.model_config.max_model_len == SEQ_LENGTH and not default.model_config.uses_mrope

    parser = argparse.ArgumentParser()
    stack.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--workers", "2", "--log-dir", str(tmp_path),
                              "--max-model-len", str(MAX_MODEL_LEN)])  # fmt: skip
    topology = stack.Stack(args)
    topology.client.close()
    assert len(topology.workers) == 2
    for worker in topology.workers:
        argv = worker.cmd[worker.cmd.index("qwen_vllm.worker_launch") + 1 :]
        opted = worker_engine_config(argv)
        assert opted.model_config.max_model_len == MAX_MODEL_LEN
        assert opted.model_config.uses_mrope and not opted.cache_config.enable_prefix_caching


def test_worker_and_stack_refuse_beyond_32768_before_starting(model_dir: Path, tmp_path: Path, capsys) -> None:
    from qwen_vllm import cli

    expected = "max_model_len=40000 is longer than this Qwen checkpoint supports"
    assert cli.main(["worker", "--model-path", str(model_dir), "--no-register", "--max-model-len", "40000"]) == 2
    err = capsys.readouterr().err
    assert "qwen-vllm worker: error: " + expected in err and "32768 tokens" in err
    assert cli.main(["stack", "--model", str(model_dir), "--log-dir", str(tmp_path), "--max-model-len", "40000"]) == 2
    err = capsys.readouterr().err
    assert "qwen-vllm stack: error: " + expected in err and "32768 tokens" in err
    assert not any(tmp_path.iterdir())  # nothing was started (no process logs)


def test_flags_decide_what_is_supported(model_dir: Path, tmp_path: Path) -> None:
    off = rewrite_config(model_dir, tmp_path / "off", use_dynamic_ntk=False, use_logn_attn=False)
    with pytest.raises(ValueError, match="max_model_len"):
        engine_config(off, max_model_len=64)
    logn_only = rewrite_config(model_dir, tmp_path / "logn", use_dynamic_ntk=False)
    cfg = engine_config(logn_only, max_model_len=MAX_MODEL_LEN)
    # LogN depends on the absolute position only: no per-request positions,
    # and cached K/V stay valid across requests.
    assert cfg.model_config.max_model_len == MAX_MODEL_LEN
    assert not cfg.model_config.uses_mrope
    assert cfg.cache_config.enable_prefix_caching


def test_config_round_trips_without_derived_keys(model_dir: Path) -> None:
    from qwen_vllm.plugin.config import QWenConfig

    cfg = QWenConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    assert cfg.model_max_length == 32768
    cfg.mrope_section = [32, 0, 0]
    out = cfg.to_dict()
    assert "model_max_length" not in out and "mrope_section" not in out
    assert QWenConfig.from_dict(out).to_dict() == out


# -- vLLM vs the reference ---------------------------------------------------------
def check_against_reference(reference: QwenReference, result: dict, alpha: int | None = None) -> None:
    prompt, tokens = result["prompt"], result["tokens"]
    alpha = alpha or reference.get_ntk_alpha(len(prompt))
    lp = reference.logprobs(prompt + tokens, alpha)
    assert max_delta(result["prompt_lp"], scored(lp, prompt, 1)) <= TOL
    assert max_delta(result["lp"], scored(lp, prompt + tokens, len(prompt))) <= TOL
    # Greedy continuation: each vLLM token is the reference's argmax given the
    # same prefix, so the reference's own greedy decode produces the same tokens.
    greedy = lp[len(prompt) - 1 : len(prompt) + len(tokens) - 1].argmax(-1).tolist()
    assert tokens == greedy


def test_mixed_buckets_in_one_batch_match_reference(long_ctx: dict, reference: QwenReference) -> None:
    assert long_ctx["tensor_parallel_size"] == 2
    results = long_ctx["mixed"]
    alphas = {reference.get_ntk_alpha(len(r["prompt"])) for r in results}
    assert alphas == {1, 3, 7, 15, 31}
    for result in results:
        check_against_reference(reference, result)


def test_chunked_prefill_is_exact(long_ctx: dict, reference: QwenReference) -> None:
    """The engine schedules at most 64 tokens a step, so prompts of 100,
    200 and 400 tokens were prefilled in chunks beside other requests' decodes."""
    assert long_ctx["max_num_batched_tokens"] == CHUNK_TOKENS
    long_ones = [r for r in long_ctx["mixed"] if len(r["prompt"]) > CHUNK_TOKENS]
    assert len(long_ones) == 3
    for result in long_ones:
        check_against_reference(reference, result)


def test_decode_across_bucket_boundary_keeps_prefill_alpha(long_ctx: dict, reference: QwenReference) -> None:
    result = next(r for r in long_ctx["mixed"] if len(r["prompt"]) == CROSSING)
    prompt, tokens = result["prompt"], result["tokens"]
    assert reference.get_ntk_alpha(CROSSING) == 3 and reference.get_ntk_alpha(CROSSING + NEW_TOKENS) == 7
    check_against_reference(reference, result, alpha=3)
    # Negative control: re-bucketing at decode (alpha from the current length,
    # as Qwen's code does without a KV cache) gives different logprobs.
    full = prompt + tokens
    crossed = [j for j in range(len(tokens)) if len(prompt) + j > 2 * SEQ_LENGTH]
    assert crossed
    rebucketed = []
    for j in crossed:
        n = len(prompt) + j  # tokens[j] is predicted from full[:n]
        lp = reference.logprobs(full[:n], reference.get_ntk_alpha(n))
        rebucketed.append(lp[n - 1, full[n]].item())
    assert max_delta([result["lp"][j] for j in crossed], rebucketed) >= CONTROL_MIN


def test_negative_control_alpha_1_without_logn_differs(long_ctx: dict, reference: QwenReference) -> None:
    for result in long_ctx["mixed"]:
        prompt = result["prompt"]
        if len(prompt) <= SEQ_LENGTH:
            continue
        plain = scored(reference.logprobs(prompt, 1, logn=False), prompt, 1)
        assert max_delta(result["prompt_lp"], plain) >= CONTROL_MIN, len(prompt)


def test_prefix_caching_across_buckets_is_disabled_and_exact(long_ctx: dict, reference: QwenReference) -> None:
    assert long_ctx["prefix_caching"] is False
    assert any("prefix caching disabled" in m for m in long_ctx["warnings"])
    short, long = long_ctx["prefix"]
    assert long["prompt"][: len(SHARED)] == short["prompt"]
    assert reference.get_ntk_alpha(len(short["prompt"])) == 15
    assert reference.get_ntk_alpha(len(long["prompt"])) == 31
    check_against_reference(reference, short)
    check_against_reference(reference, long)


def test_short_prompts_as_without_long_context(long_ctx: dict, reference: QwenReference) -> None:
    """A prompt within seq_length on the long-context engine is Qwen's plain
    RoPE (alpha 1, no LogN): its tokens and log-probs match the reference at
    alpha 1. (Bucket 0's cos/sin cache equals vLLM's stock one bit for bit:
    test_rotary_cache_and_logn_table_are_qwens; the default engine's config:
    test_max_model_len_defaults_to_seq_length_and_opts_in.)"""
    assert long_ctx["max_model_len"] == MAX_MODEL_LEN
    (short,) = long_ctx["short"]
    assert reference.get_ntk_alpha(len(short["prompt"]) + len(short["tokens"])) == 1
    check_against_reference(reference, short, alpha=1)
