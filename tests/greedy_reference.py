"""Prompt log-probs and greedy continuations, from transformers (the
independent reference) and from a vLLM engine, in the same shape so tests
can compare them position by position."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

# Mixed scripts, code, ChatML markup as plain text, digits.
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side.",
    "你好，世界！今天天气怎么样？",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]
Result = list[tuple[list[float], list[int]]]  # per prompt: (prompt log-probs, greedy tokens)


def transformers_greedy(qwen2_dir: Path, prompt_ids: list[list[int]], new_tokens: int) -> Result:
    """transformers' Qwen2 in float32 on ``qwen2_dir``."""
    score = transformers_scorer(qwen2_dir)
    out = []
    for ids in prompt_ids:
        logprobs = score(ids)
        prompt_lp = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
        # Plain greedy loop (transformers' generate() would merge in the copied
        # generation_config.json, e.g. Qwen's repetition_penalty 1.1).
        seq = list(ids)
        for _ in range(new_tokens):
            seq.append(int(score(seq)[-1].argmax()))
        out.append((prompt_lp, seq[len(ids) :]))
    return out


def vllm_greedy(llm, prompt_ids: list[list[int]], new_tokens: int) -> Result:
    """The same from a vllm.LLM (token-id prompts, no chat template)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=new_tokens, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
    return [
        ([o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], list(o.outputs[0].token_ids))
        for ids, o in zip(prompt_ids, outs)
    ]


def transformers_scorer(
    qwen2_dir: Path, lm_head_input: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[list[int]], torch.Tensor]:
    """ids -> log_softmax of transformers' Qwen2 logits (float32 weights, float64
    softmax) at every position; ``lm_head_input`` transforms each token's hidden
    state before the lm_head (e.g. rounds it as an int8 GEMM does)."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(qwen2_dir), dtype=torch.float32).eval()
    if lm_head_input is not None:
        model.lm_head.register_forward_pre_hook(lambda _, args: (lm_head_input(args[0][0]).to(args[0].dtype)[None],))

    def score(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)

    return score
