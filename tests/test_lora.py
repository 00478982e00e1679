"""LoRA adapters served unmerged, against the same adapter merged into the
weights (merge-lora) and run as a plain checkpoint.

The session's random fp32 wrapper runs with ``enable_lora=True`` (conftest);
the merged checkpoint is scored by transformers (no second engine). Adapters are written by
make-adapter in the layout Qwen's finetune.py + PEFT produce (checked against
PEFT in test_lora_files.py): r=64 on all four targets, and r=8 on two.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_vllm.checkpoints.lora import make_adapter, merge_lora
from qwen_vllm.errors import QwenAdapterError, QwenRequestError
from qwen_vllm.wrapper.chat import vLLMWrapper

QUERIES = ["Hello", "Tell me about Paris.", "你好，世界", "1 2 3 4 5"]


@pytest.fixture(scope="module")
def adapters(random_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(random_model, root / "adapter-a", seed=1),
        "b": make_adapter(random_model, root / "adapter-b", rank=8, alpha=16, seed=2, targets=["c_attn", "w2"]),
        # What finetune.py leaves for a base model: modules_to_save listed, not saved.
        "finetune-style": make_adapter(random_model, root / "finetune-style", seed=1, modules_to_save_listed=True),
    }


@pytest.fixture(scope="module")
def merged(random_model: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """transformers' Qwen2 scoring the adapter merged into the weights (merge-lora, then
    convert): ids -> log-probs at every position. float32: the fixture is bf16 on disk,
    and bf16 would round W + s·B·A (unmerged serving does not)."""
    from greedy_reference import transformers_scorer

    from qwen_vllm.checkpoints.convert import convert_to_qwen2

    root = tmp_path_factory.mktemp("merged")
    out = merge_lora(random_model, adapters["a"], root / "random-merged-a", torch.float32)
    return transformers_scorer(convert_to_qwen2(out, root / "random-merged-a-qwen2"))


def greedy(llm, prompts: list[list[int]], lora=None) -> list[list[tuple[int, float]]]:
    """(token id, its log-prob) at each generated position, per prompt."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=24, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora, use_tqdm=False)
    return [[(t, lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]


def chat_prompts(wrapper: vLLMWrapper) -> list[list[int]]:
    from qwen_vllm.chat_template import make_context

    return [make_context(wrapper.tokenizer, q, [], "You are a helpful assistant.")[0] for q in QUERIES]


def test_unmerged_equals_merged(random_wrapper, merged, adapters) -> None:
    """fp32: the adapter served unmerged gives the greedy tokens of the merged
    weights (transformers), and per position |delta log-prob| <= 1e-4."""
    prompts = chat_prompts(random_wrapper)
    unmerged = greedy(random_wrapper.llm, prompts, random_wrapper.lora_request(adapters["a"]))
    base = greedy(random_wrapper.llm, prompts)
    for prompt, got, plain in zip(prompts, unmerged, base):
        tokens = [t for t, _ in got]
        lp = merged(prompt + tokens)[len(prompt) - 1 : -1]
        assert tokens == lp.argmax(-1).tolist()
        assert max(abs(a - lp[i, t].item()) for i, (t, a) in enumerate(got)) <= 1e-4
        assert got != plain  # the adapter changes the output
    assert [t for t, _ in unmerged[0]] != [t for t, _ in base[0]]


def test_adapters_and_the_base_share_a_batch(random_wrapper, adapters) -> None:
    """batch_chat with a different adapter per conversation equals each alone;
    conversations without an adapter equal the base model."""
    names = [None, "adapter-a", str(adapters["b"]), None, "adapter-a"]
    random_wrapper.load_adapter(adapters["a"])
    queries = ["Hello", "Hello", "Hello", "Tell me about Paris.", "Tell me about Paris."]
    batch = random_wrapper.batch_chat(queries, adapter=names, do_sample=False, max_new_tokens=16)
    alone = [random_wrapper.chat(q, adapter=a, do_sample=False, max_new_tokens=16)[0] for q, a in zip(queries, names)]
    assert [r for r, _ in batch] == alone
    assert len({alone[0], alone[1], alone[2]}) == 3  # base, a and b each answer as themselves
    streamed = list(random_wrapper.chat_stream("Hello", adapter="adapter-a", do_sample=False, max_new_tokens=16))
    assert streamed[-1] == alone[1]


def test_finetune_style_adapter_serves_with_base_embeddings(random_wrapper, adapters) -> None:
    """modules_to_save listed but not saved (finetune.py's files): served as PEFT
    serves it, with the base wte/lm_head -- the same as the adapter without the list."""
    with pytest.warns(UserWarning, match="finetune.py never saved them"):
        name = random_wrapper.load_adapter(adapters["finetune-style"])
    with_list = random_wrapper.chat("Hello", adapter=name, do_sample=False, max_new_tokens=16)[0]
    assert with_list == random_wrapper.chat("Hello", adapter=adapters["a"], do_sample=False, max_new_tokens=16)[0]


def test_base_requests_stay_base_with_every_adapter_slot_in_use(random_wrapper, random_model, adapters, tmp_path) -> None:
    """max_loras (4) adapters and the base in one batch: the base rows get no
    adapter, in the batch and after it (vLLM's CPU ops read "no adapter", index
    -1, as the last slot: plugin/cpu_lora.py)."""
    prompt = chat_prompts(random_wrapper)[0]
    base = greedy(random_wrapper.llm, [prompt])[0]
    extra = [make_adapter(random_model, tmp_path / f"adapter-{seed}", seed=seed) for seed in (5, 6)]
    loras = [None, *(random_wrapper.lora_request(a) for a in (adapters["a"], adapters["b"], *extra))]
    assert random_wrapper.llm.llm_engine.vllm_config.lora_config.max_loras == len(loras) - 1
    batch = greedy(random_wrapper.llm, [prompt] * len(loras), loras)
    after = greedy(random_wrapper.llm, [prompt])[0]
    for got in (batch[0], after):
        assert [t for t, _ in got] == [t for t, _ in base]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, base)) <= 1e-4
    assert len({tuple(t for t, _ in out) for out in batch}) == len(loras)  # each adapter answers as itself


def test_cpu_lora_ops_equal_vllms_on_adapter_rows_and_leave_base_rows_alone() -> None:
    """plugin/cpu_lora.py against vLLM's own torch ops: the same product on
    rows with an adapter; nothing on rows without one (index -1), where vLLM's
    ops apply the last slot."""
    from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

    from qwen_vllm.plugin import cpu_lora

    gen = torch.Generator().manual_seed(0)
    slots, rank, hidden, out = 3, 8, 32, 48
    lora_a = torch.randn(slots, 1, rank, hidden, generator=gen).bfloat16()
    lora_b = torch.randn(slots, 1, out, rank, generator=gen).bfloat16()
    x = torch.randn(7, hidden, generator=gen).bfloat16()
    seq_lens, seq_loras = torch.tensor([2, 1, 3, 1]), torch.tensor([2, -1, 0, 1])
    idx = torch.repeat_interleave(seq_loras, seq_lens)  # [2, 2, -1, 0, 0, 0, 1]
    lora_rows, base_rows = idx >= 0, idx < 0
    meta = (None, seq_lens, seq_loras, 4, 3, 7)  # b_seq_start_loc (unused), lens, loras, batches, max len, tokens

    ours, theirs = torch.full((7, rank), 5.0), torch.zeros(7, rank)
    cpu_lora.sgmv_shrink(x, lora_a, ours, *meta, 0.5)
    vllm_ops.sgmv_shrink(x, lora_a, theirs, *meta, 0.5)
    torch.testing.assert_close(ours[lora_rows], theirs[lora_rows])
    assert not ours[base_rows].any() and theirs[base_rows].any()

    shrunk = theirs.masked_fill(base_rows[:, None], 0.0)
    y0 = torch.randn(7, 2 * out, generator=gen).bfloat16()
    for op, args in (("bgmv_expand", ()), ("bgmv_expand_slice", (out, out))):
        ours, theirs = y0.clone(), y0.clone()
        getattr(cpu_lora, op)(shrunk, lora_b, ours, idx, *args, True)
        getattr(vllm_ops, op)(shrunk, lora_b, theirs, idx, *args, True)
        torch.testing.assert_close(ours[lora_rows], theirs[lora_rows])
        assert torch.equal(ours[base_rows], y0[base_rows])
    ours, theirs = torch.zeros(7, out).bfloat16(), torch.zeros(7, out).bfloat16()
    cpu_lora.sgmv_expand(shrunk, lora_b, ours, *meta, False)
    vllm_ops.sgmv_expand(shrunk, lora_b, theirs, *meta, False)
    torch.testing.assert_close(ours, theirs)  # base rows: a zero shrink gives zero either way


def test_bad_adapters_fail_before_the_engine_sees_them(random_wrapper, random_model, scripted_model, adapters, tmp_path) -> None:
    too_big = make_adapter(random_model, tmp_path / "r128", rank=128, seed=4)
    with pytest.raises(QwenAdapterError, match=r"LoRA rank 128 is above the engine's max_lora_rank 64; start it with --max-lora-rank 128"):
        random_wrapper.load_adapter(too_big)
    other = make_adapter(scripted_model, tmp_path / "for-scripted", rank=8)
    with pytest.raises(QwenAdapterError, match="is the adapter for another base model"):  # hidden 256 vs 128
        random_wrapper.load_adapter(other)
    qwen2_named = tmp_path / "qwen2-named"
    shutil.copytree(adapters["b"], qwen2_named)
    tensors = load_file(qwen2_named / "adapter_model.safetensors")
    tensors = {k.replace("attn.c_attn", "self_attn.q_proj"): v for k, v in tensors.items()}
    save_file(tensors, qwen2_named / "adapter_model.safetensors")
    with pytest.raises(QwenAdapterError, match=r"unknown tensor .*self_attn\.q_proj\.lora_A"):
        random_wrapper.load_adapter(qwen2_named)
    full = make_adapter(random_model, tmp_path / "with-embeddings", rank=8, with_modules_to_save=True)
    with pytest.raises(QwenAdapterError, match=r"trains \['lm_head', 'transformer.wte'\] in full .* qwen-vllm merge-lora"):
        random_wrapper.load_adapter(full)
    with pytest.raises(QwenRequestError, match=r"'nope' is neither a loaded adapter name \(loaded: .*adapter-a"):
        random_wrapper.chat("Hello", adapter="nope")
    assert random_wrapper.chat("Hello", adapter="adapter-a", max_new_tokens=4)[0]  # the engine still serves
