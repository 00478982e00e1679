"""vLLMWrapper benchmarks, side by side in one run on the random fixture.

(a) chat() vs raw vllm.LLM.generate on the same token ids and sampling
    (greedy, exactly N new tokens): wrapper overhead ratio (goal <= 1.05).
(b) batch_chat of B conversations vs B sequential chat() calls: throughput
    ratio (goal >= 8).
(c) vLLMWrapper.batch_chat vs transformers generate() on the converted Qwen2
    copy (the README's transformers path), same prompts and lengths.

Medians over --runs, interleaved. Prints a table, writes results/bench_wrapper.json.
    python scripts/bench_wrapper.py [--runs 5] [--batch 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qwen_vllm.bench.engine import save_report


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", help="Qwen v1 checkpoint (default: a fresh random fixture)")
    parser.add_argument("--out", default="results/bench_wrapper.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import Qwen2ForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qwen_vllm.bench.engine import transformers_generate
    from qwen_vllm.chat_template import make_context
    from qwen_vllm.checkpoints.convert import convert_to_qwen2
    from qwen_vllm.checkpoints.fixtures import make_model
    from qwen_vllm.stop_words import CHATML_STOP_IDS
    from qwen_vllm.wrapper.chat import vLLMWrapper

    work = Path(tempfile.mkdtemp(prefix="bench-wrapper-"))
    model_dir = Path(args.model) if args.model else make_model(work / "random", "random")
    n = args.new_tokens
    gen = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0)
    print("starting the engine ...", file=sys.stderr)
    wrapper = vLLMWrapper(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048)
    tok = wrapper.tokenizer
    queries = [f"Question number {i}: tell me something about topic {i}." for i in range(args.batch)]
    raw_params = SamplingParams(
        temperature=0, max_tokens=n, min_tokens=n, stop_token_ids=list(CHATML_STOP_IDS), repetition_penalty=1.0
    )
    ids0 = make_context(tok, queries[0], [])[0]
    # Same work: identical ids in, identical tokens out.
    assert wrapper.chat(queries[0], **gen)[0] == wrapper.llm.generate(
        [TokensPrompt(prompt_token_ids=ids0)], raw_params, use_tqdm=False
    )[0].outputs[0].text

    a_wrap, a_raw, b_batch, b_seq = [], [], [], []
    for r in range(args.runs):
        print(f"run {r + 1}/{args.runs} ...", file=sys.stderr)
        a_raw.append(timed(lambda: wrapper.llm.generate([TokensPrompt(prompt_token_ids=ids0)], raw_params, use_tqdm=False)))
        a_wrap.append(timed(lambda: wrapper.chat(queries[0], **gen)))
        b_batch.append(timed(lambda: wrapper.batch_chat(queries, **gen)))
        b_seq.append(timed(lambda: [wrapper.chat(q, **gen) for q in queries]))

    print("transformers reference ...", file=sys.stderr)
    qwen2 = convert_to_qwen2(model_dir, work / "qwen2")
    hf = Qwen2ForCausalLM.from_pretrained(str(qwen2), dtype=torch.float32).eval()
    contexts = [make_context(tok, q, [])[0] for q in queries]

    def hf_batch() -> None:
        transformers_generate(hf, contexts, n)

    c_hf, c_wrap = [], []
    for _ in range(max(1, args.runs // 2)):
        c_hf.append(timed(hf_batch))
        c_wrap.append(timed(lambda: wrapper.batch_chat(queries, **gen)))

    med = statistics.median
    tokens_batch = args.batch * n
    result = {
        "model": str(model_dir),
        "batch": args.batch,
        "new_tokens": n,
        "a_overhead": {"wrapper_s": med(a_wrap), "raw_llm_generate_s": med(a_raw), "ratio": med(a_wrap) / med(a_raw)},
        "b_batching": {
            "batch_chat_tok_s": tokens_batch / med(b_batch),
            "sequential_chat_tok_s": tokens_batch / med(b_seq),
            "ratio": med(b_seq) / med(b_batch),
        },
        "c_vs_transformers": {
            "wrapper_batch_tok_s": tokens_batch / med(c_wrap),
            "transformers_generate_tok_s": tokens_batch / med(c_hf),
            "ratio": med(c_hf) / med(c_wrap),
        },
    }
    a, b, c = result["a_overhead"], result["b_batching"], result["c_vs_transformers"]
    print("\n| comparison | ours | anchor | ratio |\n|---|---|---|---|")
    print(f"| (a) chat() latency vs raw LLM.generate, s | {a['wrapper_s']:.3f} | {a['raw_llm_generate_s']:.3f} | {a['ratio']:.3f} (time, goal <= 1.05) |")
    print(f"| (b) batch_chat({args.batch}) vs sequential chat(), tok/s | {b['batch_chat_tok_s']:.0f} | {b['sequential_chat_tok_s']:.0f} | {b['ratio']:.2f}x (goal >= 8) |")
    print(f"| (c) batch_chat vs transformers generate, tok/s | {c['wrapper_batch_tok_s']:.0f} | {c['transformers_generate_tok_s']:.0f} | {c['ratio']:.2f}x |")
    return save_report(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
