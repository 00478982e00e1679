"""The plugin's QWenLMHeadModel on vLLM vs transformers' own Qwen2ForCausalLM
on the converted copy (an independent implementation), float32."""

from __future__ import annotations

import os

import pytest
import torch

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side.",
    "你好，世界！今天天气怎么样？",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "emoji 🦙🙂 mixed 中文 English",
    "a" * 3 + " long " * 60 + "end",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompt_ids(qwen_tokenizer) -> list[list[int]]:
    return [qwen_tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(random_qwen2, prompt_ids):
    """Per-position prompt log-probs and greedy continuations from transformers."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(random_qwen2), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            logits = model(torch.tensor([ids])).logits[0]
            logprobs = torch.log_softmax(logits.double(), -1)
            prompt_lp = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
            # Plain greedy loop (transformers' generate() would merge in the copied
            # generation_config.json, e.g. Qwen's repetition_penalty 1.1).
            seq = list(ids)
            for _ in range(NEW_TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            out.append((prompt_lp, seq[len(ids) :]))
    return out


def vllm_run(llm, prompt_ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
    result = []
    for ids, out in zip(prompt_ids, outs):
        prompt_lp = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        result.append((prompt_lp, list(out.outputs[0].token_ids)))
    return result


def test_logprobs_and_greedy_match_transformers(random_wrapper, prompt_ids, reference) -> None:
    got = vllm_run(random_wrapper.llm, prompt_ids)
    worst = 0.0
    for (ref_lp, ref_gen), (lp, gen) in zip(reference, got):
        worst = max(worst, max(abs(a - b) for a, b in zip(ref_lp, lp)))
        assert gen == ref_gen
    assert worst <= 1e-4, f"max |logprob diff| {worst}"
    # The comparison is meaningful: the model is not near-uniform.
    assert min(min(lp) for lp, _ in reference) < -5


@pytest.fixture(scope="module")
def tp2_llm(random_model):
    """tensor_parallel_size=2 on two CPU cores (one OpenMP group per rank)."""
    from vllm import LLM

    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        llm = LLM(
            str(random_model),
            tensor_parallel_size=2,
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            trust_remote_code=True,
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_tensor_parallel_2_equals_1(tp2_llm, prompt_ids, reference) -> None:
    got = vllm_run(tp2_llm, prompt_ids)
    for (ref_lp, ref_gen), (lp, gen) in zip(reference, got):
        assert gen == ref_gen
        assert max(abs(a - b) for a, b in zip(ref_lp, lp)) <= 1e-4
