"""Qwen ReAct prompt building and reply parsing (no engine).

Expected prompts are written out literally (react_cases.py, and below), not
built with the module's own templates, so a drifted TOOL_DESC or
REACT_INSTRUCTION fails.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from react_cases import ARGS, WEATHER, WEATHER_INSTRUCTION

from qwen_vllm.chat_template import RenderedChat, render_messages
from qwen_vllm.checkpoints import fixtures
from qwen_vllm.errors import QwenRequestError
from qwen_vllm.tools.react import (
    ReactParser,
    parse_react,
    react_messages,
    tool_choice_name,
    tool_specs,
)


def test_instruction_is_qwens_verbatim() -> None:
    msgs, open_final = react_messages([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    assert not open_final
    assert msgs == [{"role": "user", "content": WEATHER_INSTRUCTION + "\n\nQuestion: Weather in Paris?"}]


def test_two_tools_and_qwen_style_fields() -> None:
    image = {
        "name_for_human": "文生图",
        "name_for_model": "image_gen",
        "description_for_model": "Draws a picture.",
        "parameters": [{"name": "prompt", "required": True, "schema": {"type": "string"}}],
    }
    msgs, _ = react_messages([{"role": "user", "content": "q"}], [WEATHER, image])
    text = msgs[0]["content"]
    assert (
        "\n\nimage_gen: Call this tool to interact with the 文生图 API. What is the 文生图 API useful for? "
        'Draws a picture. Parameters: [{"name": "prompt", "required": true, "schema": {"type": "string"}}]\n\n'
    ) in text
    assert "should be one of [get_weather, image_gen]\n" in text


def test_history_rewriting_and_completion_mode() -> None:
    """Tool call -> 'Thought/Action/Action Input', result -> '\\nObservation:',
    '\\nThought:' when it is last; the instruction goes to the LAST HISTORY
    user turn (Qwen's parse_messages), system and stripping as Qwen does."""
    messages = [
        {"role": "system", "content": "\nBe brief.\n"},
        {"role": "user", "content": "Weather in Paris?\n"},
        {
            "role": "assistant",
            "content": "I need the weather.",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "22 degrees, sunny"},
    ]
    msgs, open_final = react_messages(messages, [WEATHER])
    assert open_final
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": WEATHER_INSTRUCTION + "\n\nQuestion: Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Thought: I need the weather.\nAction: get_weather\nAction Input: " + ARGS
            + "\nObservation: 22 degrees, sunny\nThought:",
        },
    ]
    # The final answer closes the turn; a new question keeps the instruction
    # on the last history turn, not on the new query.
    messages += [
        {"role": "assistant", "content": "It is 22 degrees."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    msgs, open_final = react_messages(messages, [WEATHER])
    assert not open_final
    assert msgs[2]["content"].endswith(
        "\nObservation: 22 degrees, sunny\nThought: I now know the final answer.\nFinal Answer: It is 22 degrees."
    )
    assert msgs[1]["content"].startswith(WEATHER_INSTRUCTION) and msgs[3] == {"role": "user", "content": "And tomorrow?"}


def test_legacy_function_call_history_equals_tool_calls() -> None:
    legacy = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ARGS}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    modern = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": json.loads(ARGS)}}]},
        {"role": "tool", "tool_call_id": "x", "content": "sunny"},
    ]
    assert react_messages(legacy, [WEATHER["function"]]) == react_messages(modern, [WEATHER])
    assert react_messages(legacy, [WEATHER])[0][-1]["content"] == (
        "Thought: \nAction: get_weather\nAction Input: " + ARGS + "\nObservation: sunny\nThought:"
    )


def test_parallel_calls_are_sequenced_by_tool_call_id() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Two cities.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "A"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "B"}'}},
        ]},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "tool", "tool_call_id": "a", "content": "sun"},
    ]
    msgs, _ = react_messages(messages, [WEATHER])
    assert msgs[-1]["content"] == (
        'Thought: Two cities.\nAction: get_weather\nAction Input: {"city": "A"}\nObservation: sun\n'
        'Thought: \nAction: get_weather\nAction Input: {"city": "B"}\nObservation: rain\nThought:'
    )


@pytest.mark.parametrize(
    ("messages", "tools", "needle"),
    [
        ([{"role": "assistant", "content": "x"}], [WEATHER], "at least one user message"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], [WEATHER], "must follow an assistant"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], [WEATHER], "only allowed first"),
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "s"}], [WEATHER], "'robot' is not supported"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         [WEATHER], "exactly one user message"),
        ([{"role": "user", "content": "q"}], [{"type": "retrieval"}], "only 'function' tools"),
        ([{"role": "user", "content": "q"}], [{"type": "function", "function": {"name": "a b"}}], "must be 1-64"),
        ([{"role": "user", "content": "q"}], [WEATHER, WEATHER], "duplicate tool name"),
        ([{"role": "user", "content": "q"}],
         [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 3}}}}}],
         "not a valid JSON Schema (at properties/x/type)"),
        ([{"role": "user", "content": "q"}],
         [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "type must be 'object'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
          {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "tool", "tool_call_id": "z", "content": "2"}],
         [WEATHER], "no matching tool call"),
    ],
)
def test_bad_requests_name_the_problem(messages, tools, needle) -> None:
    with pytest.raises(QwenRequestError, match=None) as err:
        react_messages(messages, tools)
    assert needle in str(err.value)


def test_tool_choice_name() -> None:
    specs = tool_specs([WEATHER])
    assert tool_choice_name("auto", specs) is None
    assert tool_choice_name({"type": "function", "function": {"name": "get_weather"}}, specs) == "get_weather"
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(QwenRequestError, match="tool_choice"):
            tool_choice_name(bad, specs)


# -- parsing --------------------------------------------------------------------
ACTION_TEXT = fixtures.REACT_ACTION.removesuffix("Observation:")  # what the "Observation:" stop leaves


@pytest.mark.parametrize(
    ("text", "kwargs", "content", "call"),
    [
        (ACTION_TEXT, {}, "I need the current weather in Paris.", ("get_weather", ARGS)),
        (fixtures.REACT_ACTION, {}, "I need the current weather in Paris.", ("get_weather", ARGS)),
        (fixtures.REACT_ANSWER, {"continuation": True}, "It is 22 degrees and sunny in Paris.", None),
        ("Thought: done\nFinal Answer: 42", {}, "42", None),
        ("Just an answer.", {}, "Just an answer.", None),
        ("Thought: hmm", {}, "Thought: hmm", None),
        ('Action: get_weather\nAction Input: {"city": "X"}', {}, "", ("get_weather", '{"city": "X"}')),
        # Not a call (unknown tool, not a JSON object, no Action Input): plain content.
        ('Thought: x\nAction: get_date\nAction Input: {}\n', {}, 'Thought: x\nAction: get_date\nAction Input: {}\n', None),
        ("Thought: x\nAction: get_weather\nAction Input: Paris\n", {}, "Thought: x\nAction: get_weather\nAction Input: Paris\n", None),
        ("Thought: x\nAction: get_weather\n", {}, "Thought: x\nAction: get_weather\n", None),
        # A named tool_choice accepts only that tool.
        (ACTION_TEXT, {"only": "get_time"}, ACTION_TEXT, None),
    ],
)
def test_parse_rules(text, kwargs, content, call) -> None:
    reply = parse_react(text, [WEATHER, {"type": "function", "function": {"name": "get_time"}}], **kwargs)
    assert reply.content == content
    assert (reply.tool_call.name, reply.tool_call.arguments) == call if call else reply.tool_call is None
    assert reply.finish_reason == ("tool_calls" if call else "stop")


@pytest.mark.parametrize(
    "text",
    [
        ACTION_TEXT,
        fixtures.REACT_ANSWER,
        "Thought: a\nFinal Answer: b\nAction: get_weather\nAction Input: {}",
        "Plain words\nmore words\nAction: get_weather\nAction Input: {\"city\": \"Q\"}\nObservation: x",
        "Thought: x\nAction: get_weather\nAction Input: Paris",
        "Thought: x\nAction: nope\nAction Input: {}",
        "Thought: unfinished",
        "\n\nThou",
        "",
    ],
)
def test_stream_adds_up_to_the_whole_parse(text) -> None:
    """Fed one character at a time, the released pieces equal the whole parse
    and are never retracted (the parser raises if it would)."""
    specs = tool_specs([WEATHER])
    for continuation in (False, True):
        parser = ReactParser(specs, continuation=continuation)
        content, name, args = "", None, ""
        for end in range(len(text) + 1):
            c, n, a = parser.feed(text[:end], final=False)
            content, args, name = content + c, args + a, name or n
        c, n, a = parser.feed(text, final=True)
        content, args, name = content + c, args + a, name or n
        whole = parse_react(text, specs, continuation=continuation)
        assert content == whole.content
        assert (name, args) == ((whole.tool_call.name, whole.tool_call.arguments) if whole.tool_call else (None, ""))


def test_arguments_stream_in_fragments_after_the_name() -> None:
    parser = ReactParser(tool_specs([WEATHER]))
    events = [parser.feed(ACTION_TEXT[:end], final=False) for end in range(len(ACTION_TEXT) + 1)]
    first = next(i for i, (_, name, _) in enumerate(events) if name)
    assert all(not a for _, _, a in events[:first])
    fragments = [a for _, _, a in events[first:] if a]
    assert len(fragments) > 5 and "".join(fragments) == ARGS


# -- the template path ------------------------------------------------------------
def test_template_routes_tools_and_keeps_ids(qwen_tokenizer) -> None:
    """tokenize=False returns text that re-encodes to the rendered ids, with
    special-token text in user content kept as text."""
    messages = [{"role": "user", "content": "Is <|im_start|> a tool? <|endoftext|>"}]
    ids = qwen_tokenizer.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    text = qwen_tokenizer.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert isinstance(text, RenderedChat) and text.token_ids == tuple(ids)
    assert pickle.loads(pickle.dumps(text)).token_ids == copy.deepcopy(text).token_ids == text.token_ids
    assert qwen_tokenizer(text)["input_ids"] == ids == qwen_tokenizer.encode(text)
    assert ids.count(151644) == 3 and 151643 not in ids  # system, user, assistant headers only
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + WEATHER_INSTRUCTION + "\n\nQuestion: Is <|im_start|> a tool? <|endoftext|><|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    # A plain string (a raw /v1/completions prompt) is Qwen's encode: specials parse.
    assert qwen_tokenizer(str(text))["input_ids"].count(151644) == 4


def test_template_continues_after_a_tool_result(qwen_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "t", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    ids = qwen_tokenizer.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert qwen_tokenizer.decode(ids).endswith("<|im_start|>assistant\nThought: t\nAction: get_weather\n"
                                               "Action Input: {}\nObservation: r\nThought:")
    # Tool history without tools is still rewritten (Qwen does too), minus the instruction.
    plain = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert qwen_tokenizer.decode(plain).endswith("user\nq<|im_end|>\n<|im_start|>assistant\nThought: t\n"
                                                 "Action: get_weather\nAction Input: {}\nObservation: r\nThought:")
    msgs, open_final = react_messages(messages, [WEATHER])
    assert ids == render_messages(qwen_tokenizer, msgs, add_generation_prompt=False, continue_final_message=open_final)
