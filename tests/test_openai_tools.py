"""OpenAI tool calling for Qwen v1 on vLLM's own server (the session's, with
the flags ``qwen-vllm serve`` adds: serve.vllm_argv), and the same from
Python on vLLMWrapper.

The scripted fixture replies to a ChatML prompt carrying Qwen's ReAct
instruction with a ReAct action (fixtures.REACT_ACTION) and, after a prompt
ending "\nThought:", with the final answer (fixtures.REACT_ANSWER); without
the instruction, with fixtures.CHAT_REPLY.
"""

from __future__ import annotations

import json

import openai
import pytest
from react_cases import ARGS, FINAL_ANSWER, THOUGHT, TIME, WEATHER, WEATHER_INSTRUCTION
from vllm_server import GREEDY, client_for, stream_chat

from qwen_vllm.checkpoints import fixtures

QUESTION = "What's the weather like in Paris?"
TOOL_RESULT = "22 degrees, sunny"
ACTION_TEXT = fixtures.REACT_ACTION.removesuffix("Observation:")  # what the "Observation:" stop leaves


def second_step_prompt(tokenizer) -> list[int]:
    """Qwen's completion-mode prompt after the tool result, written out and
    encoded as one string (as Qwen's openai_api.py encodes it)."""
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{WEATHER_INSTRUCTION}\n\nQuestion: {QUESTION}<|im_end|>\n"
        f"<|im_start|>assistant\nThought: {THOUGHT}\nAction: get_weather\nAction Input: {ARGS}\n"
        f"Observation: {TOOL_RESULT}\nThought:"
    )
    return tokenizer.encode_text(text, allowed_special="all")


@pytest.fixture(scope="module")
def react_server(openai_server: str):
    return (openai_server, *client_for(openai_server))


def test_tool_call(react_server) -> None:
    _, client, model = react_server
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == THOUGHT
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_tool_call_streamed(react_server) -> None:
    """Tool-call deltas: the first carries id, type and name; the arguments
    follow in fragments that add up to the JSON object."""
    _, client, model = react_server
    content, calls, finish = stream_chat(
        client, model=model, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER], **GREEDY
    )
    assert content == THOUGHT and finish == "tool_calls"
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert all(c.index == 0 and not c.id and c.function.name is None for c in calls[1:])
    fragments = [c.function.arguments for c in calls if c.function.arguments]
    assert len(fragments) > 3
    assert json.loads("".join(fragments)) == {"city": "Paris", "unit": "celsius"}


def test_multi_step_exchange(react_server, qwen_tokenizer) -> None:
    """Tool call -> tool result -> final answer; the engine's prompt is Qwen's
    completion-mode layout (instruction + Question, Thought/Action/Action
    Input/Observation, open turn ending "\\nThought:"), encoded independently."""
    _, client, model = react_server
    messages = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], **GREEDY)
    call = first.choices[0].message.tool_calls[0]
    messages += [
        first.choices[0].message.model_dump(include={"role", "content", "tool_calls"}),
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT},
    ]
    final = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], extra_body={"return_token_ids": True}, **GREEDY
    )
    assert final.choices[0].message.content == FINAL_ANSWER
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.prompt_token_ids == second_step_prompt(qwen_tokenizer)
    content, calls, finish = stream_chat(client, model=model, messages=messages, tools=[WEATHER], **GREEDY)
    assert (content, calls, finish) == (FINAL_ANSWER, [], "stop")


def test_unparseable_calls_fall_back_to_content(react_server) -> None:
    """The model calls a tool that was not offered (get_weather with only
    get_time), or not the one a named tool_choice asks for: plain content,
    never an error, in both modes."""
    _, client, model = react_server
    messages = [{"role": "user", "content": QUESTION}]
    cases = [
        {"tools": [TIME]},
        {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    ]
    for kw in cases:
        reply = client.chat.completions.create(model=model, messages=messages, **kw, **GREEDY)
        assert reply.choices[0].message.content == ACTION_TEXT and not reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "stop"
        assert stream_chat(client, model=model, messages=messages, **kw, **GREEDY) == (ACTION_TEXT, [], "stop")


def test_named_tool_choice(react_server) -> None:
    """A named choice returns that call; finish_reason is "stop" (OpenAI's rule for named calls)."""
    _, client, model = react_server
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **GREEDY,
    )
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == ARGS
    assert reply.choices[0].finish_reason == "stop"


def test_tool_choice_none_is_plain_chat(react_server, qwen_tokenizer) -> None:
    _, client, model = react_server
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER], tool_choice="none",
        extra_body={"return_token_ids": True}, **GREEDY,
    )
    assert reply.prompt_token_ids == qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert reply.choices[0].message.content == fixtures.CHAT_REPLY  # no ReAct instruction in the prompt
    assert not reply.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"city": {"type": "strang"}}}}}]}, "not a valid JSON Schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "type must be 'object'"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "must be 1-64 characters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_get_400(react_server, kw, needle) -> None:
    _, client, model = react_server
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}], stream=stream, **kw, **GREEDY
            )
        assert needle in str(err.value)


def test_legacy_functions_api(react_server, qwen_tokenizer) -> None:
    """Qwen's openai_api.py clients: ``functions`` in, ``message.function_call``
    and finish_reason "function_call" out (streamed too); legacy history
    (assistant function_call, role "function") gives the same prompt as tools."""
    _, client, model = react_server
    messages = [{"role": "user", "content": QUESTION}]
    functions = [WEATHER["function"]]
    reply = client.chat.completions.create(model=model, messages=messages, functions=functions, **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.content == THOUGHT
    assert not choice.message.tool_calls
    assert (choice.message.function_call.name, choice.message.function_call.arguments) == ("get_weather", ARGS)
    name, args, finish = None, "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, functions=functions, stream=True, **GREEDY):
        delta = chunk.choices[0].delta
        assert not delta.tool_calls
        if delta.function_call:
            name = name or delta.function_call.name
            args += delta.function_call.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, args, finish) == ("get_weather", ARGS, "function_call")
    messages += [
        {"role": "assistant", "content": THOUGHT, "function_call": {"name": "get_weather", "arguments": ARGS}},
        {"role": "function", "name": "get_weather", "content": TOOL_RESULT},
    ]
    final = client.chat.completions.create(
        model=model, messages=messages, functions=functions, function_call="auto",
        extra_body={"return_token_ids": True}, **GREEDY,
    )
    assert final.choices[0].message.content == FINAL_ANSWER and final.choices[0].finish_reason == "stop"
    assert final.prompt_token_ids == second_step_prompt(qwen_tokenizer)
    with pytest.raises(openai.BadRequestError, match="function_call"):
        client.chat.completions.create(model=model, messages=messages, functions=functions, function_call="sometimes")


# Qwen's examples/function_call_examples.py style (its test_2 sends it as ``functions``).
QWEN_STYLE_WEATHER = {
    "name_for_human": "天气查询",
    "name_for_model": "get_weather",
    "description_for_model": "Get the current weather in a city.",
    "parameters": [
        {"name": "city", "description": "城市", "required": True, "schema": {"type": "string"}},
        {"name": "unit", "description": "unit", "required": False, "schema": {"type": "string"}},
    ],
}
# Qwen's openai_api.py TOOL_DESC for it, written out: the parameters list is dumped as given.
QWEN_STYLE_DESC = (
    "get_weather: Call this tool to interact with the 天气查询 API. What is the 天气查询 API useful for? "
    "Get the current weather in a city. Parameters: "
    '[{"name": "city", "description": "城市", "required": true, "schema": {"type": "string"}}, '
    '{"name": "unit", "description": "unit", "required": false, "schema": {"type": "string"}}]'
)


@pytest.mark.parametrize("field", ["functions", "tools"])
def test_qwen_style_function_definitions(react_server, qwen_tokenizer, field) -> None:
    """Qwen-style definitions (name_for_model, a parameter list) through the
    real server: Qwen's own prompt, and a call in the reply, stream and not
    (``function_call`` for legacy ``functions``, ``tool_calls`` for ``tools``)."""
    _, client, model = react_server
    messages = [{"role": "user", "content": QUESTION}]
    kw = {field: [QWEN_STYLE_WEATHER], "extra_body": {"return_token_ids": True}, **GREEDY}
    reply = client.chat.completions.create(model=model, messages=messages, **kw)
    assert QWEN_STYLE_DESC in qwen_tokenizer.decode(reply.prompt_token_ids)
    msg = reply.choices[0].message
    if field == "functions":
        assert reply.choices[0].finish_reason == "function_call" and not msg.tool_calls
        call = msg.function_call
    else:
        assert reply.choices[0].finish_reason == "tool_calls" and msg.function_call is None
        call = msg.tool_calls[0].function
    assert (call.name, json.loads(call.arguments)) == ("get_weather", json.loads(ARGS))
    streamed, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **{field: [QWEN_STYLE_WEATHER]}, **GREEDY):
        delta = chunk.choices[0].delta
        parts = [delta.function_call] if delta.function_call else [c.function for c in delta.tool_calls or []]
        streamed += "".join(p.arguments or "" for p in parts if p)
        finish = chunk.choices[0].finish_reason or finish
    assert json.loads(streamed) == json.loads(ARGS) and finish == ("function_call" if field == "functions" else "tool_calls")
    bad = [{**QWEN_STYLE_WEATHER, "parameters": [{"description": "no name"}]}]
    with pytest.raises(openai.BadRequestError, match=rf"{field}\[0\]\.parameters\[0\]: expected an object with a non-empty 'name'"):
        client.chat.completions.create(model=model, messages=messages, **{field: bad}, **GREEDY)


def test_unserved_route_answers_in_openai_shape(react_server) -> None:
    """vLLM's own app with ``qwen-vllm serve``'s middleware: /v1/embeddings gets
    an OpenAI-shaped 404 saying why, which the openai SDK raises as NotFoundError."""
    base, client, model = react_server
    with pytest.raises(openai.NotFoundError, match="POST /v1/embeddings is not served by this server: Qwen chat models"):
        client.embeddings.create(model=model, input="hi")
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])


# -- the same tool use from Python, without a server ---------------------------------
def test_chat_with_tools_on_vllm_wrapper(scripted_wrapper) -> None:
    """vLLMWrapper + function_call.chat_with_tools: the same call and final
    answer as the server, with no server."""
    from qwen_vllm.wrapper.tools import chat_with_tools

    model = scripted_wrapper
    messages = [{"role": "user", "content": QUESTION}]
    reply = chat_with_tools(model, messages, [WEATHER], do_sample=False)
    assert reply.finish_reason == "tool_calls" and reply.content == THOUGHT
    assert (reply.tool_call.name, reply.tool_call.arguments) == ("get_weather", ARGS)
    messages += [reply.message, {"role": "tool", "tool_call_id": reply.tool_call.id, "content": TOOL_RESULT}]
    final = chat_with_tools(model, messages, [WEATHER], do_sample=False)
    assert (final.content, final.tool_call, final.finish_reason) == (FINAL_ANSWER, None, "stop")
