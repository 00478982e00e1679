"""The plugin's QWenLMHeadModel on vLLM vs transformers' own Qwen2ForCausalLM
on the converted copy (an independent implementation), float32. (TP=2 equals
TP=1 on unquantized weights: tests/test_long_context.py, whose TP=2 engine
serves prompts inside and beyond seq_length; on GPTQ: tests/test_gptq.py.)"""

from __future__ import annotations

import pytest
from greedy_reference import PROMPTS, transformers_greedy, vllm_greedy

PROMPTS = [
    *PROMPTS,
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
    return transformers_greedy(random_qwen2, prompt_ids, NEW_TOKENS)


def vllm_run(llm, prompt_ids):
    return vllm_greedy(llm, prompt_ids, NEW_TOKENS)


def test_logprobs_and_greedy_match_transformers(random_wrapper, prompt_ids, reference) -> None:
    got = vllm_run(random_wrapper.llm, prompt_ids)
    worst = 0.0
    for (ref_lp, ref_gen), (lp, gen) in zip(reference, got):
        worst = max(worst, max(abs(a - b) for a, b in zip(ref_lp, lp)))
        assert gen == ref_gen
    assert worst <= 1e-4, f"max |logprob diff| {worst}"
    # The comparison is meaningful: the model is not near-uniform.
    assert min(min(lp) for lp, _ in reference) < -5
