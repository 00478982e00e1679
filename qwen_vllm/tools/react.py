"""Qwen's ReAct function calling: OpenAI tools -> Qwen's prompt, reply -> tool call.

Qwen-Chat learned tool use from the prompt that Qwen's ``openai_api.py`` builds
(its openai_api.py and examples/react_prompt.md), so this module reproduces it exactly:

* every tool becomes ``TOOL_DESC`` (verbatim), joined by blank lines into
  ``REACT_INSTRUCTION`` (verbatim), which is prepended as
  ``"{instruction}\\n\\nQuestion: {question}"`` to ONE user turn: the last
  user turn of the history when there is history, else the current query
  (that is what Qwen's ``parse_messages`` does);
* in the history an assistant tool call becomes
  ``Thought: {content}\\nAction: {name}\\nAction Input: {arguments}``, a tool
  result appends ``\\nObservation: {result}`` to it, and a plain assistant
  reply becomes ``Thought: I now know the final answer.\\nFinal Answer: ...``;
* when the conversation ends with a tool result, the assistant turn stays
  open and ends with ``\\nThought:`` (completion mode);
* ``Observation:`` is a stop word, so the model stops where the tool's result
  would go.

Input is OpenAI's (``tools`` with JSON-Schema ``parameters``, assistant
``tool_calls``, ``tool`` messages) or the legacy/Qwen one (bare function dicts
with ``name_for_model``/``name_for_human``/``description_for_model``,
assistant ``function_call``, ``function`` messages). Bad input raises
``QwenRequestError`` (HTTP 400 on vLLM's server).

Replies are parsed by ``ReactParser`` (one implementation for streaming and
whole replies: a whole reply is the stream fed at once). Rules, Qwen's
``parse_response`` with three deliberate differences: markers also count at
the very start of the reply, the first of ``Action:`` / ``Final Answer:``
wins (Qwen takes the last Final Answer), and a call counts only if it names
one of the given tools and its Action Input is a JSON object. Anything else
is returned as plain content, never an error.

``qwen_vllm.wrapper.tools.chat_with_tools`` runs one ReAct turn on
``vLLMWrapper`` without a server.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen_vllm.errors import QwenRequestError

# Verbatim from Qwen's openai_api.py: the models were trained on these strings.
TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API."
    " What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

# vLLM's --tool-call-parser name for the parser in tool_parser.py.
PARSER_NAME = "qwen_react"
OBSERVATION_STOP = "Observation:"
REACT_STOP_WORDS = (OBSERVATION_STOP,)
FINAL_ANSWER_PREFIX = "Thought: I now know the final answer.\nFinal Answer: "

_THOUGHT = "Thought:"
_ACTION = "\nAction:"
_ACTION_INPUT = "\nAction Input:"
_OBSERVATION = "\nObservation:"
_FINAL_ANSWER = "\nFinal Answer:"
# OpenAI's rule for function names; also keeps "Action: {name}" on one line.
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# -- tools --------------------------------------------------------------------
@dataclass(frozen=True)
class ToolSpec:
    """One tool as Qwen's prompt names it. ``name`` is what tool calls carry."""

    name: str
    name_for_model: str
    name_for_human: str
    description_for_model: str
    parameters: Any

    def describe(self) -> str:
        return TOOL_DESC.format(
            name_for_model=self.name_for_model,
            name_for_human=self.name_for_human,
            description_for_model=self.description_for_model,
            parameters=json.dumps(self.parameters, ensure_ascii=False),
        )


def _check_parameters(where: str, params: Any) -> Any:
    if params is None:
        return {}
    if isinstance(params, list):  # Qwen's own style: a list of parameter dicts
        for i, p in enumerate(params):
            if not isinstance(p, Mapping) or not isinstance(p.get("name"), str) or not p["name"]:
                raise QwenRequestError(f"{where}.parameters[{i}]: expected an object with a non-empty 'name'")
        return params
    if not isinstance(params, Mapping):
        raise QwenRequestError(f"{where}.parameters: expected a JSON Schema object, got {type(params).__name__}")
    if params.get("type", "object") != "object":
        raise QwenRequestError(f"{where}.parameters: the schema's type must be 'object', got {params.get('type')!r}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(params).check_schema(params)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise QwenRequestError(
            f"{where}.parameters is not a valid JSON Schema" + (f" (at {path})" if path else "") + f": {exc.message}"
        ) from None
    return dict(params)


def _text_field(where: str, fn: Mapping[str, Any], key: str) -> str | None:
    value = fn.get(key)
    if value is not None and not isinstance(value, str):
        raise QwenRequestError(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


# Where a Qwen-style definition rides along an OpenAI tool through vLLM's
# request model, which drops unknown fields of a tool and of its function but
# passes ``parameters`` (a JSON Schema, where "x-" keywords are allowed) as is.
QWEN_STYLE_KEY = "x-qwen-function"


def is_qwen_style(fn: Any) -> bool:
    """A function described Qwen's way (``name_for_model``/``name_for_human``/
    ``description_for_model``, ``parameters`` as a list of dicts), as Qwen's
    openai_api.py and its examples send it."""
    return isinstance(fn, Mapping) and (
        "name_for_model" in fn or "description_for_model" in fn or isinstance(fn.get("parameters"), list)
    )


def openai_tool(fn: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An OpenAI ``tools`` entry vLLM's request model accepts for a function
    definition of either style; a Qwen-style one is kept whole under
    QWEN_STYLE_KEY in its ``parameters``, so the prompt is built from it
    exactly as Qwen's server did."""
    if not is_qwen_style(fn):
        return {"type": "function", "function": dict(fn)}
    (spec,) = _specs_at(fn, where)
    params = spec.parameters
    if isinstance(params, list):
        props = {p["name"]: {**(p.get("schema") or {}), "description": p.get("description", "")} for p in params}
        params = {"type": "object", "properties": props, "required": [p["name"] for p in params if p.get("required")]}
    params = {**params, QWEN_STYLE_KEY: dict(fn)}
    function = {"name": spec.name_for_model, "description": spec.description_for_model, "parameters": params}
    return {"type": "function", "function": function}


def _carried_qwen_style(tool: Mapping[str, Any]) -> Mapping[str, Any] | None:
    fn = tool.get("function")
    params = fn.get("parameters") if isinstance(fn, Mapping) else None
    carried = params.get(QWEN_STYLE_KEY) if isinstance(params, Mapping) else None
    return carried if isinstance(carried, Mapping) else None


def _specs_at(fn: Mapping[str, Any], where: str) -> list[ToolSpec]:
    try:
        return tool_specs([fn])
    except QwenRequestError as exc:
        raise QwenRequestError(str(exc).replace("tools[0]", where, 1)) from None


def tool_specs(tools: Sequence[Mapping[str, Any]] | None) -> list[ToolSpec]:
    """Validate OpenAI ``tools`` (or legacy ``functions`` / Qwen-style tool
    dicts) and return them in prompt order."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise QwenRequestError("tools: expected a list of tools")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise QwenRequestError(f"{where}: expected an object, got {type(tool).__name__}")
        carried = _carried_qwen_style(tool)
        if carried is not None:  # converted by openai_tool
            fn = carried
        elif "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise QwenRequestError(f"{where}.type: only 'function' tools are supported, got {tool.get('type')!r}")
            fn = tool.get("function")
            where += ".function"
            if not isinstance(fn, Mapping):
                raise QwenRequestError(f"{where}: expected an object with the function's name and parameters")
        else:
            fn = tool
        name = _text_field(where, fn, "name")
        name_for_model = _text_field(where, fn, "name_for_model") or name
        if not name_for_model:
            raise QwenRequestError(f"{where}.name: required")
        for key, value in (("name", name), ("name_for_model", name_for_model)):
            if value is not None and not _NAME_RE.match(value):
                raise QwenRequestError(
                    f"{where}.{key}: {value!r} must be 1-64 characters of a-z, A-Z, 0-9, '_' or '-'"
                )
        description = _text_field(where, fn, "description") or ""
        spec = ToolSpec(
            name=name or name_for_model,
            name_for_model=name_for_model,
            name_for_human=_text_field(where, fn, "name_for_human") or name or name_for_model,
            description_for_model=_text_field(where, fn, "description_for_model") or description,
            parameters=_check_parameters(where, fn.get("parameters")),
        )
        if any(s.name == spec.name or s.name_for_model == spec.name_for_model for s in specs):
            raise QwenRequestError(f"{where}: duplicate tool name {spec.name!r}")
        specs.append(spec)
    return specs


def react_instruction(specs: Sequence[ToolSpec]) -> str:
    """Qwen's ReAct instruction for these tools."""
    return REACT_INSTRUCTION.format(
        tools_text="\n\n".join(s.describe() for s in specs),
        tools_name_text=", ".join(s.name_for_model for s in specs),
    ).lstrip("\n").rstrip()


# -- messages -------------------------------------------------------------------
@dataclass
class _Step:
    role: str  # system | user | assistant | function
    content: str
    call: tuple[str, str] | None = None  # (name, arguments) of an assistant tool call


def _clean(text: str) -> str:
    """Qwen's per-message normalisation."""
    return text.lstrip("\n").rstrip()


def _content(i: int, msg: Mapping[str, Any]) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise QwenRequestError(f"messages[{i}].content: expected a string, got {type(content).__name__}")


def _arguments(where: str, args: Any) -> str:
    if isinstance(args, str):
        return args
    if isinstance(args, Mapping):
        return json.dumps(args, ensure_ascii=False)
    raise QwenRequestError(f"{where}.arguments: expected a JSON string, got {type(args).__name__}")


def _call(where: str, fn: Any, model_names: Mapping[str, str]) -> tuple[str, str]:
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise QwenRequestError(f"{where}: expected an object with a non-empty 'name' and 'arguments'")
    return model_names.get(fn["name"], fn["name"]), _arguments(where, fn.get("arguments", ""))


def _steps(messages: Sequence[Mapping[str, Any]], model_names: Mapping[str, str]) -> list[_Step]:
    """OpenAI or legacy messages -> Qwen's role/content/function_call steps.

    An assistant message with several ``tool_calls`` becomes one step per call,
    each followed by its ``tool`` result (matched by ``tool_call_id``, else in
    order), which is how Qwen's format sequences them.
    """
    steps: list[_Step] = []
    i = 0
    while i < len(messages):
        msg = messages[i]
        if not isinstance(msg, Mapping):
            raise QwenRequestError(f"messages[{i}]: expected an object")
        role = msg.get("role")
        content = _content(i, msg)
        if role == "assistant" and msg.get("tool_calls"):
            if not isinstance(msg["tool_calls"], list):
                raise QwenRequestError(f"messages[{i}].tool_calls: expected a list")
            call_ids, calls = [], []
            for n, item in enumerate(msg["tool_calls"]):
                item = item if isinstance(item, Mapping) else {}
                call_ids.append(item.get("id"))
                calls.append(_call(f"messages[{i}].tool_calls[{n}].function", item.get("function"), model_names))
            j = i + 1
            while j < len(messages) and isinstance(messages[j], Mapping) and messages[j].get("role") == "tool":
                j += 1
            results = _match_results(i, call_ids, messages, range(i + 1, j))
            for n, (call, result) in enumerate(zip(calls, results)):
                steps.append(_Step("assistant", content if n == 0 else "", call))
                if result is not None:
                    steps.append(_Step("function", result))
            i = j
            continue
        if role == "assistant" and msg.get("function_call") is not None:
            call = _call(f"messages[{i}].function_call", msg["function_call"], model_names)
            steps.append(_Step("assistant", content, call))
        elif role in ("tool", "function"):
            steps.append(_Step("function", content))
        elif role in ("system", "user", "assistant"):
            steps.append(_Step(role, content))
        else:
            raise QwenRequestError(
                f"messages[{i}].role: {role!r} is not supported; use system, user, assistant, tool or function"
            )
        i += 1
    return steps


def _match_results(
    i: int, call_ids: list[str | None], messages: Sequence[Mapping[str, Any]], indices: range
) -> list[str | None]:
    """Tool results aligned with the calls they answer (None: no result yet)."""
    results: list[str | None] = [None] * len(call_ids)
    unmatched: list[int] = []
    for j in indices:
        cid = messages[j].get("tool_call_id")
        slot = next((n for n, c in enumerate(call_ids) if c is not None and c == cid and results[n] is None), None)
        if slot is None:
            unmatched.append(j)
        else:
            results[slot] = _content(j, messages[j])
    for j in unmatched:
        slot = next((n for n, r in enumerate(results) if r is None), None)
        if slot is None:
            raise QwenRequestError(
                f"messages[{j}]: a tool result with no matching tool call in messages[{i}].tool_calls"
            )
        results[slot] = _content(j, messages[j])
    return results


def react_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, str]], bool]:
    """(ChatML role/content messages, open_final) for a tool conversation.

    ``open_final`` is True when the conversation ends with a tool result or an
    assistant turn: the last (assistant) message must then be continued, not
    closed. Same rewriting as Qwen's ``parse_messages``.
    """
    specs = tool_specs(tools)
    model_names = {s.name: s.name_for_model for s in specs}
    steps = _steps(messages, model_names)
    if not any(s.role == "user" for s in steps):
        raise QwenRequestError("messages: expected at least one user message")
    system = None
    if steps[0].role == "system":
        system = _clean(steps.pop(0).content)

    merged: list[list[str]] = []  # [role, content]
    for idx, step in enumerate(steps):
        content = _clean(step.content)
        if step.role == "function":
            if not merged or merged[-1][0] != "assistant":
                raise QwenRequestError("messages: a tool result must follow an assistant message (its tool call)")
            merged[-1][1] += f"\nObservation: {content}"
            if idx == len(steps) - 1:
                merged[-1][1] += "\nThought:"  # completion mode: the model goes on from here
        elif step.role == "assistant":
            if not merged:
                raise QwenRequestError("messages: an assistant message must follow a user message")
            if step.call is not None:
                name, args = step.call
                if not content.startswith(_THOUGHT):
                    content = f"Thought: {content}"
                content = f"{content}\nAction: {name}\nAction Input: {args}"
            elif specs:
                content = FINAL_ANSWER_PREFIX + content
            if merged[-1][0] == "user":
                merged.append(["assistant", _clean(content)])
            else:
                merged[-1][1] += "\n" + content
        elif step.role == "user":
            merged.append(["user", content])
        else:
            raise QwenRequestError("messages: a system message is only allowed first")

    query = merged.pop()[1] if merged[-1][0] == "user" else None
    if len(merged) % 2 or any(
        merged[k][0] != "user" or merged[k + 1][0] != "assistant" for k in range(0, len(merged), 2)
    ):
        raise QwenRequestError(
            "messages: expected exactly one user message (or tool result) before every assistant message"
        )
    pairs = [[_clean(merged[k][1]), _clean(merged[k + 1][1])] for k in range(0, len(merged), 2)]
    if specs:
        instruction = react_instruction(specs)
        if pairs:
            pairs[-1][0] = f"{instruction}\n\nQuestion: {pairs[-1][0]}"
        else:
            query = f"{instruction}\n\nQuestion: {query}"

    out = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if query is not None:
        out.append({"role": "user", "content": query})
    return out, query is None


def has_tool_history(messages: Sequence[Mapping[str, Any]]) -> bool:
    """True when messages carry tool calls or results (they need ReAct rewriting)."""
    return any(
        isinstance(m, Mapping)
        and (m.get("role") in ("tool", "function") or m.get("tool_calls") or m.get("function_call") is not None)
        for m in messages
    )


# -- replies --------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as the model wrote it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ReactReply:
    """A parsed reply: content and at most one tool call (Qwen calls one per turn)."""

    content: str
    tool_call: ToolCall | None = None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_call else "stop"

    @property
    def message(self) -> dict[str, Any]:
        """The OpenAI assistant message to append to ``messages`` for the next turn."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_call:
            msg["tool_calls"] = [self.tool_call.to_openai()]
        return msg


@dataclass(frozen=True)
class _View:
    """What a reply prefix certainly means: content, and a committed call."""

    content: str = ""
    name: str | None = None
    args: str = ""


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of text that could start ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _json_object_prefix(text: str) -> bool:
    """Could ``text`` still grow into a JSON object?"""
    if not text.startswith("{"):
        return False
    from partial_json_parser import Allow, loads

    try:
        loads(text, Allow.ALL)
    except Exception:  # partial_json_parser raises several types on malformed input
        return False
    return True


class ReactParser:
    """Turns a ReAct reply into content and a tool call, incrementally.

    ``feed(text, final)`` takes the cumulative reply and returns the new
    (content, tool name, arguments) pieces. Pieces are only released once no
    later text can change them, so a stream's pieces add up to the whole
    reply's parse — except when a call's arguments stop being valid JSON after
    they started streaming (streamed pieces cannot be taken back; the whole
    reply then falls back to plain content).

    ``continuation``: the prompt ended in "\\nThought:" (after a tool result),
    so the reply continues a ReAct step. ``only``: the one tool name a
    named ``tool_choice`` allows.
    """

    def __init__(self, specs: Sequence[ToolSpec], *, continuation: bool = False, only: str | None = None) -> None:
        self.by_model_name = {s.name_for_model: s for s in specs if only is None or s.name == only}
        self.continuation = continuation
        self.sent = _View()
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"

    def feed(self, text: str, *, final: bool) -> tuple[str, str | None, str]:
        """(new content, tool name if the call starts now, new argument text)."""
        view = self._view(text, final)
        if self.sent.name is not None and view.name is None:
            view = self.sent  # arguments went bad after the call started: keep what was sent
        new_name = view.name if view.name is not None and self.sent.name is None else None
        if not view.content.startswith(self.sent.content) or not view.args.startswith(self.sent.args):
            raise RuntimeError(f"ReactParser would retract streamed text: {self.sent} -> {view}")
        delta = (view.content[len(self.sent.content):], new_name, view.args[len(self.sent.args):])
        self.sent = view
        return delta

    def result(self) -> ReactReply:
        """The reply fed so far (call after ``feed(..., final=True)``)."""
        call = ToolCall(self.sent.name, self.sent.args, self.call_id) if self.sent.name is not None else None
        return ReactReply(self.sent.content, call)

    # A view depends only on (text, final); see the module docstring for the rules.
    def _view(self, text: str, final: bool) -> _View:
        marked = "\n" + text  # markers may open the reply
        stripped = text.lstrip()
        if self.continuation or stripped.startswith(_THOUGHT):
            return self._react_view(text, marked, final)
        if not final and _THOUGHT.startswith(stripped):
            return _View()  # might still become "Thought:"
        return self._plain_view(text, marked, final)

    def _react_view(self, text: str, marked: str, final: bool) -> _View:
        a, f = marked.find(_ACTION), marked.find(_FINAL_ANSWER)
        if f >= 0 and (a < 0 or f < a):
            answer = marked[f + len(_FINAL_ANSWER):]
            return _View(answer[1:] if answer.startswith(" ") else answer)
        if a >= 0:
            thought = marked[:a]
            t = thought.find(_THOUGHT)
            thought = (thought[t + len(_THOUGHT):] if t >= 0 else thought).strip()
            view = self._call_view(marked, a, thought, final)
            if view is not None:
                return view
        return _View(text) if final else _View()

    def _plain_view(self, text: str, marked: str, final: bool) -> _View:
        a = marked.find(_ACTION)
        if a < 0:
            return _View(text if final else text[: len(text) - min(_held(marked, _ACTION), len(text))])
        before = marked[1:a]
        view = self._call_view(marked, a, before, final)
        if view is not None:
            return view
        return _View(text) if final else _View(before)

    def _call_view(self, marked: str, a: int, content: str, final: bool) -> _View | None:
        """The call that starts at ``a``, or None while (or if) it is not one."""
        j = marked.find(_ACTION_INPUT, a + len(_ACTION))
        if j < 0:
            return None
        spec = self.by_model_name.get(marked[a + len(_ACTION): j].strip())
        if spec is None:
            return None
        rest = marked[j + len(_ACTION_INPUT):]
        k = rest.find(_OBSERVATION)
        if final or k >= 0:
            args = (rest[:k] if k >= 0 else rest).strip()
            return _View(content, spec.name, args) if _json_object(args) else None
        args = rest[: len(rest) - _held(rest, _OBSERVATION)].strip()
        if not _json_object_prefix(args):
            return None
        return _View(content, spec.name, args)


def parse_react(
    text: str,
    tools: Sequence[Mapping[str, Any]] | Sequence[ToolSpec] | None,
    *,
    continuation: bool = False,
    only: str | None = None,
) -> ReactReply:
    """Parse a whole ReAct reply (``tools``: the request's tools or their specs)."""
    specs = [t for t in tools or () if isinstance(t, ToolSpec)] or tool_specs(tools)
    parser = ReactParser(specs, continuation=continuation, only=only)
    parser.feed(text, final=True)
    return parser.result()


def tool_choice_name(tool_choice: Any, specs: Sequence[ToolSpec]) -> str | None:
    """The tool a named ``tool_choice`` forces (None for "auto"/"required");
    raises QwenRequestError for anything else."""
    if tool_choice in ("auto", "required", None):
        return None
    name = None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type", "function") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not any(s.name == name for s in specs):
        raise QwenRequestError(
            f"tool_choice: {tool_choice!r} is not 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': <one of the tools>}}"
        )
    return name
