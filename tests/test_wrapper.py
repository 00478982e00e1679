"""vLLMWrapper: Qwen's chat() interface on vLLM (scripted and random fixtures)."""

from __future__ import annotations

import pytest
from vllm_server import STOP_PROMPT

from qwen_vllm.chat_template import make_context
from qwen_vllm.checkpoints.fixtures import CHAT_REPLY
from qwen_vllm.errors import QwenContextError, QwenRequestError
from qwen_vllm.wrapper.chat import vLLMWrapper


def test_chat_returns_the_scripted_reply(scripted_wrapper) -> None:
    history = [("Hi", "Hello!")]
    response, new_history = scripted_wrapper.chat("Who are you?", history=history, do_sample=False)
    assert response == CHAT_REPLY
    assert new_history == [("Hi", "Hello!"), ("Who are you?", CHAT_REPLY)]
    assert history == [("Hi", "Hello!")]  # the caller's list is never mutated
    # The Qwen README's call: keywords, no history.
    assert scripted_wrapper.chat(query="Hi", history=None, do_sample=False) == (CHAT_REPLY, [("Hi", CHAT_REPLY)])


def test_three_turn_history_and_transformers_call_order(scripted_wrapper) -> None:
    tok = scripted_wrapper.tokenizer
    history: list = []
    for query in ("one", "two", "three"):
        # model.chat(tokenizer, query, history) -- transformers' argument order
        response, history = scripted_wrapper.chat(tok, query, history, do_sample=False)
        assert response == CHAT_REPLY
    assert [q for q, _ in history] == ["one", "two", "three"]
    ids, kept = make_context(tok, "four", history)
    assert kept == 3 and tok.decode(ids).count("<|im_start|>assistant\n" + CHAT_REPLY + "<|im_end|>") == 3


def test_stream_final_text_equals_chat(scripted_wrapper) -> None:
    chunks = list(scripted_wrapper.chat_stream("Hi", do_sample=False))
    assert chunks[-1] == CHAT_REPLY
    assert len(chunks) > 10  # token by token, not one blob
    assert all(CHAT_REPLY.startswith(c) for c in chunks)  # cumulative, never retracted
    assert not any("\ufffd" in c for c in chunks)  # the llama emoji spans 3 tokens
    deltas = list(scripted_wrapper.chat_stream("Hi", do_sample=False, delta=True))
    assert "".join(deltas) == CHAT_REPLY and " 🦙" in deltas


def test_stream_never_shows_a_stop_word_fragment(scripted_wrapper) -> None:
    stop = "scripted Qwen"
    chunks = list(scripted_wrapper.chat_stream("Hi", stop_words_ids=[stop], do_sample=False))
    final = chunks[-1]
    assert final == CHAT_REPLY[: CHAT_REPLY.index(stop)]
    assert all(final.startswith(c) for c in chunks)


def test_batch_chat_equals_sequential(scripted_wrapper) -> None:
    queries = [f"question {i}" for i in range(16)]
    batch = scripted_wrapper.batch_chat(queries, do_sample=False)
    assert [r for r, _ in batch] == [scripted_wrapper.chat(q, do_sample=False)[0] for q in queries]
    assert batch[3][1] == [("question 3", CHAT_REPLY)]


def test_batch_chat_equals_sequential_on_random_weights(random_wrapper) -> None:
    queries = ["alpha", "你好", "def f(x):", "1 2 3", "a much longer question " * 5, "z", "?!", "emoji 🦙"]
    batch = [r for r, _ in random_wrapper.batch_chat(queries, do_sample=False, max_new_tokens=24)]
    sequential = [random_wrapper.chat(q, do_sample=False, max_new_tokens=24)[0] for q in queries]
    assert batch == sequential
    assert len(set(batch)) == len(queries)


def test_max_new_tokens_and_stop_words(scripted_wrapper) -> None:
    short, _ = scripted_wrapper.chat("Hi", max_new_tokens=4, do_sample=False)
    assert short == "Hello! I am"
    tok = scripted_wrapper.tokenizer
    cut = CHAT_REPLY[: CHAT_REPLY.index(" fixture")]
    assert scripted_wrapper.chat("Hi", stop_words_ids=[" fixture"], do_sample=False)[0] == cut
    ids = tok.encode(" fixture")
    assert scripted_wrapper.chat("Hi", stop_words_ids=[ids], do_sample=False)[0] == cut
    # A single-id stop word stops as a token; stop text never appears in output.
    assert scripted_wrapper.chat("Hi", stop_words_ids=[[tok.encode("!")[0]]], do_sample=False)[0] == "Hello"


def test_generation_config_object_and_greedy(scripted_wrapper) -> None:
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=2)
    assert scripted_wrapper.chat("Hi", generation_config=cfg)[0] == "Hello!"
    # kwargs override generation_config
    assert scripted_wrapper.chat("Hi", generation_config=cfg, max_new_tokens=3)[0] == "Hello! I"


def test_seed_makes_sampling_reproducible(random_wrapper) -> None:
    def sample(seed: int) -> str:
        return random_wrapper.chat("tell me a story", do_sample=True, temperature=1.0, top_p=1.0, seed=seed, max_new_tokens=16)[0]

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_bad_arguments(scripted_wrapper) -> None:
    with pytest.raises(TypeError, match="unknown generation argument 'max_lenght'"):
        scripted_wrapper.chat("Hi", max_lenght=3)
    with pytest.raises(QwenContextError, match=r"needs \d+ tokens"):
        scripted_wrapper.chat("word " * 3000)
    with pytest.raises(QwenRequestError, match="temperature"):
        scripted_wrapper.chat("Hi", temperature=-1.0)
    with pytest.raises(QwenRequestError, match="history\\[0\\]"):
        scripted_wrapper.chat("Hi", history=[("only one",)])
    with pytest.raises(TypeError, match="use chat_stream"):
        scripted_wrapper.chat("Hi", stream=True)


def test_unknown_engine_argument_is_a_type_error(scripted_model) -> None:
    with pytest.raises(TypeError, match="unknown engine argument 'max_model_length'.*max_model_len"):
        vLLMWrapper(str(scripted_model), max_model_length=512)


def test_engine_kwargs_reach_vllm(scripted_wrapper) -> None:
    assert scripted_wrapper.max_model_len == 2048
    assert scripted_wrapper.llm.llm_engine.model_config.enforce_eager


def test_chat_checkpoint_stops_at_im_end_even_on_raw_requests(scripted_wrapper, qwen_tokenizer) -> None:
    """On a chat checkpoint <|im_end|> ends a request even when asked for raw
    engine output (the base-model side: test_gptq.py's Int8 fixture), and
    generate() stops at every ChatML id; a batch equals its prompts one by one."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from qwen_vllm.plugin.tokenizer import IM_END_ID

    only_im_end = SamplingParams(max_tokens=3, temperature=0.0, allowed_token_ids=[IM_END_ID])
    prompt = TokensPrompt(prompt_token_ids=qwen_tokenizer.encode_text("Hi"))
    [out] = scripted_wrapper.llm.generate([prompt], only_im_end, use_tqdm=False)
    assert list(out.outputs[0].token_ids) == [IM_END_ID] and out.outputs[0].finish_reason == "stop"
    prompts = [STOP_PROMPT, "<|im_start|>assistant\n"]
    pair = scripted_wrapper.generate(prompts, do_sample=False, max_new_tokens=40)
    assert pair == [" one", CHAT_REPLY] == [scripted_wrapper.generate(p, do_sample=False, max_new_tokens=40) for p in prompts]


def test_readme_import_is_the_wrapper() -> None:
    """``from vllm_wrapper import vLLMWrapper`` (Qwen's README) is this wrapper. The
    README's pattern (the model built at a script's top level, no main guard)
    runs with an engine in test_chat_ui.py::test_cli_in_process_model."""
    import vllm_wrapper

    assert vllm_wrapper.vLLMWrapper is vLLMWrapper
