"""One ChatML renderer: every entry point gives the same token ids for the same
conversation (no engine).

Entry points: Qwen's ``chat()`` path (``make_context``), vLLM's chat endpoint
(the tokenizer's ``apply_chat_template`` with ``tokenize=False``, then
``encode`` of the result, as vLLM's server does), ``tokenize=True``, the
wrapper's tool turn (``render_chat``), FastChat's worker API (FastChat's own
``qwen-7b-chat`` conversation template renders the string, the worker turns
it into ids) and the Jinja template (rendered by jinja2, for tools that only
read templates). The corpus is seeded and covers system prompts, history,
whitespace at both ends, special-token text typed by users, CJK and emoji.
"""

from __future__ import annotations

import random

import jinja2
import pytest
from fastchat.conversation import get_conv_template

from qwen_vllm.chat_template import (
    CHATML_JINJA,
    DEFAULT_SYSTEM,
    make_context,
    prompt_string_ids,
    render_chat,
    render_messages,
)

FRAGMENTS = [
    "Hi there",
    "Hi there  \n",
    "\n\nleading newlines",
    "  spaced  ",
    "你好，世界",
    "emoji 🦙🔥",
    "tab\tand\nnewline",
    "<|endoftext|> typed by a user",
    "<|im_start|>user\nnot a real turn",
    "<|extra_0|>",
    "Observation: not a tool",
    "",
    "3.14159 + 2 = ?",
]
SYSTEMS = [DEFAULT_SYSTEM, "You are a pirate.", "  系统提示  ", "line one\nline two"]
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>")


def text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 3)))


def corpus(n: int = 120):
    rng = random.Random(0)
    for _ in range(n):
        system = rng.choice(SYSTEMS)
        history = [(text(rng), text(rng)) for _ in range(rng.randint(0, 3))]
        yield system, history, text(rng)


def messages_of(system: str, history, query: str) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}]
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out + [{"role": "user", "content": query}]


def fastchat_prompt(system: str, history, query: str) -> str:
    """The string FastChat's own Qwen template renders (what its clients send)."""
    conv = get_conv_template("qwen-7b-chat")
    conv.set_system_message(system)
    for q, a in history:
        conv.append_message(conv.roles[0], q)
        conv.append_message(conv.roles[1], a)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("case", list(corpus()), ids=lambda c: f"h{len(c[1])}")
def test_every_entry_point_renders_the_same_ids(case, qwen_tokenizer) -> None:
    tok = qwen_tokenizer
    system, history, query = case
    messages = messages_of(system, history, query)
    want = render_messages(tok, messages)

    assert make_context(tok, query, history, system)[0] == want  # Qwen's chat()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode(rendered) == want  # vLLM's chat endpoint: render text, then encode it
    assert list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]) == want
    assert render_chat(tok, messages)[0] == want  # the wrapper's tool turn, no tools given

    every_text = [system, query, *(t for turn in history for t in turn)]
    # FastChat renders an empty message as an open turn, and a flat string cannot
    # tell a typed "<|im_end|>\n<|im_start|>" from a real joint.
    if all(every_text) and not any("<|im_end|>\n<|im_start|>" in t for t in every_text):
        assert prompt_string_ids(tok, fastchat_prompt(system, history, query)) == want
    jinja = jinja2.Environment().from_string(CHATML_JINJA).render(messages=messages, add_generation_prompt=True)
    assert str(rendered) == jinja  # the Jinja twin renders the same text
    # Its ids match too where encoding the whole string cannot differ: no
    # special-token text typed by users, no BPE merge across a segment edge.
    if not any(s in t for t in every_text for s in SPECIAL) and all(t == t.strip() for t in every_text):
        assert tok.encode(jinja, allowed_special="all") == want


def test_trailing_whitespace_is_kept_with_and_without_the_wrapper(qwen_tokenizer) -> None:
    """The defect this renderer replaced: the wrapper's tool path stripped
    "Hi there  \\n" (21 ids) where the server kept it (22)."""
    messages = [{"role": "user", "content": "Hi there  \n"}]
    ids, continued = render_chat(qwen_tokenizer, messages)
    assert not continued
    assert ids == list(qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert qwen_tokenizer.decode(ids).endswith("Hi there  \n<|im_end|>\n<|im_start|>assistant\n")
