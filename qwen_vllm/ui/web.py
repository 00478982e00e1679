"""Web chat UI (gradio 6) for any OpenAI-compatible server.

``python -m qwen_vllm.ui.web --api-url http://127.0.0.1:8000/v1`` (or
``qwen-vllm web``; ``qwen-vllm stack --web`` starts it against the stack's
OpenAI front). Replies stream in; the model list comes from /v1/models;
system prompt, temperature, top_p, max tokens (and vLLM's extra sampling
settings) are per request; Stop, Regenerate and Clear work while streaming.

Unlike Qwen's web_demo, the conversation sent to the model is kept apart
from what the chat shows: it is the raw text typed and received (the chat
renders Markdown, the model never sees HTML), and error notices appear in the
chat but never enter the conversation. Every failure — server down, no model
served yet, a 4xx from the API, a bad setting — becomes one readable line in
the chat; the client has timeouts and no retries, so nothing hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (offline machines)

import gradio as gr  # noqa: E402
import openai  # noqa: E402

from qwen_vllm.chat_template import DEFAULT_SYSTEM  # noqa: E402
from qwen_vllm.errors import QwenRequestError  # noqa: E402
from qwen_vllm.settings import SETTINGS, openai_params  # noqa: E402
from qwen_vllm.ui.client import (  # noqa: E402
    DEFAULT_TIMEOUT,
    api_base_url,
    chat_messages,
    describe_api_error,
    list_models,
    make_async_client,
    make_client,
)

log = logging.getLogger(__name__)

Turns = list[dict[str, str]]  # [{"role": "user"|"assistant", "content": raw text}]
MAIN_SETTINGS = ("temperature", "top_p", "max_new_tokens")
# Blank = the server's default (the model's generation_config on vLLM).
EXTRA_SETTINGS = ("top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_new_tokens", "seed")
NOTICE_PREFIX = "⚠️ "


def notice(text: str) -> dict[str, str]:
    """A chat bubble that explains a problem; shown, never sent to the model."""
    return {"role": "assistant", "content": NOTICE_PREFIX + text}


def answered(turns: Sequence[dict[str, str]]) -> Turns:
    """Drop a trailing unanswered user turn (its request failed or was stopped)."""
    turns = [dict(t) for t in turns]
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    return turns


class ChatApp:
    """The UI's components and handlers for one API URL."""

    def __init__(self, api_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = api_base_url(api_url)
        self.client = make_client(self.url, api_key, timeout)
        self.aclient = make_async_client(self.url, api_key, timeout)

    # -- model list ------------------------------------------------------------
    def _models(self) -> tuple[list[str], str]:
        """(served model ids, status line)."""
        try:
            models = list_models(self.client)
        except openai.OpenAIError as exc:
            return [], NOTICE_PREFIX + describe_api_error(exc, self.url)
        if not models:
            return [], (
                f"{NOTICE_PREFIX}No model is served at {self.url} yet (GET /v1/models lists none): "
                "start a worker, then press Refresh models."
            )
        return models, f"Connected to {self.url} · {len(models)} model{'s' if len(models) > 1 else ''}"

    async def refresh_models(self, current: str | None) -> dict:
        models, status = await asyncio.to_thread(self._models)
        value = current if current in models else (models[0] if models else None)
        return {self.model: gr.update(choices=models, value=value), self.status: status}

    # -- chat ------------------------------------------------------------------
    async def respond(
        self, message: str, turns: Turns, model: str | None, system: str, *settings: Any
    ) -> AsyncIterator[dict]:
        if not (message or "").strip():
            yield {self.message: ""}
            return
        turns = [*answered(turns), {"role": "user", "content": message}]
        yield {self.message: "", self.chatbot: turns, self.turns: turns}
        async for update in self._reply(turns, model, system, settings):
            yield update

    async def regenerate(self, turns: Turns, model: str | None, system: str, *settings: Any) -> AsyncIterator[dict]:
        turns = [dict(t) for t in turns]
        if turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            yield {self.chatbot: [notice("Nothing to regenerate yet: send a message first.")], self.turns: []}
            return
        yield {self.chatbot: turns, self.turns: turns}
        async for update in self._reply(turns, model, system, settings):
            yield update

    async def _reply(self, turns: Turns, model: str | None, system: str, values: Sequence[Any]) -> AsyncIterator[dict]:
        """Stream the assistant's reply to ``turns`` (which end with the user's)."""
        main, extra = values[: len(MAIN_SETTINGS)], values[len(MAIN_SETTINGS) :]
        try:
            settings = dict(zip(MAIN_SETTINGS, main))
            settings.update(
                {name: SETTINGS[name].parse(text) for name, text in zip(EXTRA_SETTINGS, extra) if (text or "").strip()}
            )
            params = openai_params(settings)
        except QwenRequestError as exc:
            yield {self.chatbot: [*turns, notice(f"Invalid setting: {exc}")]}
            return
        if not model:
            models, status = await asyncio.to_thread(self._models)
            yield {self.model: gr.update(choices=models, value=models[0] if models else None), self.status: status}
            if not models:
                yield {self.chatbot: [*turns, notice(status.removeprefix(NOTICE_PREFIX))]}
                return
            model = models[0]
        reply = {"role": "assistant", "content": ""}
        finish = None
        try:
            stream = await self.aclient.chat.completions.create(
                model=model, messages=chat_messages(system or "", turns), stream=True, **params
            )
            # Leaving this block (done, error, or Stop cancelling the task)
            # closes the HTTP stream, which makes the server abort the request.
            async with stream:
                async for chunk in stream:
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    finish = choice.finish_reason or finish
                    if choice.delta.content:
                        reply["content"] += choice.delta.content
                        shown = [*turns, dict(reply)]
                        yield {self.chatbot: shown, self.turns: shown}
        except openai.OpenAIError as exc:
            kept = [*turns, dict(reply)] if reply["content"] else turns
            yield {self.chatbot: [*kept, notice(describe_api_error(exc, self.url))], self.turns: kept}
            return
        if not reply["content"]:
            yield {self.chatbot: [*turns, notice(f"The model finished without any text (finish_reason={finish}).")]}
        elif finish == "length":
            shown = [*turns, dict(reply)]
            yield {self.chatbot: [*shown, notice("Reply cut at the max new tokens limit.")], self.turns: shown}

    def clear(self) -> dict:
        return {self.chatbot: [], self.turns: [], self.message: ""}

    # -- layout ------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Qwen chat") as demo:
            self.turns = gr.State([])
            gr.Markdown(f"### Qwen chat · `{self.url}`")
            with gr.Row():
                with gr.Column(scale=3):
                    self.chatbot = gr.Chatbot(
                        label="Chat",
                        elem_id="chat",
                        height=520,
                        buttons=["copy", "copy_all"],
                        feedback_options=None,
                        allow_tags=False,
                    )
                    with gr.Row():
                        self.message = gr.Textbox(
                            placeholder="Type a message, Enter to send",
                            show_label=False,
                            elem_id="message",
                            scale=6,
                            autofocus=True,
                        )
                        send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                    with gr.Row():
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        regen = gr.Button("Regenerate", elem_id="regenerate")
                        clear = gr.Button("Clear", elem_id="clear")
                with gr.Column(scale=1):
                    self.model = gr.Dropdown(
                        label="Model", choices=[], value=None, allow_custom_value=True, elem_id="model"
                    )
                    refresh = gr.Button("Refresh models", size="sm", elem_id="refresh")
                    self.status = gr.Markdown(elem_id="status")
                    system = gr.Textbox(label="System prompt", value=DEFAULT_SYSTEM, lines=3, elem_id="system")
                    main = [
                        gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature", elem_id="temperature"),
                        gr.Slider(0.01, 1, value=0.8, step=0.01, label="Top p", elem_id="top_p"),
                        gr.Slider(1, 8192, value=512, step=1, label="Max new tokens", elem_id="max_new_tokens"),
                    ]
                    with gr.Accordion("More settings (blank = server default)", open=False):
                        extra = [
                            gr.Textbox(
                                label=f"{name} ({SETTINGS[name].describe()})",
                                placeholder="server default",
                                info=SETTINGS[name].help or None,
                                elem_id=name,
                            )
                            for name in EXTRA_SETTINGS
                        ]
            params = [self.model, system, *main, *extra]
            out = [self.chatbot, self.turns, self.message, self.model, self.status]
            chat_event = gr.on(
                [self.message.submit, send.click], self.respond, [self.message, self.turns, *params], out
            )
            regen_event = regen.click(self.regenerate, [self.turns, *params], out)
            running = [chat_event, regen_event]
            stop.click(None, cancels=running)
            clear.click(self.clear, None, out, cancels=running)
            self.chatbot.clear(self.clear, None, out, cancels=running)  # the chat's own trash button
            refresh.click(self.refresh_models, [self.model], [self.model, self.status])
            demo.load(self.refresh_models, [self.model], [self.model, self.status])
        return demo


def build_ui(api_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> gr.Blocks:
    """The gradio app for ``api_url`` (not launched: call ``.queue().launch()``)."""
    return ChatApp(api_url, api_key, timeout).build()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        required=True,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (/v1 is added if missing)",
    )
    parser.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY or none)")
    parser.add_argument(
        "--host", "--server-name", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", "--server-port", type=int, default=7860, help="port to bind (default 7860)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds the API may stay silent before the UI gives up"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="chats served at once (default 16)")


def run(args: argparse.Namespace) -> int:
    try:
        demo = build_ui(args.api_url, args.api_key, args.timeout)
    except ValueError as exc:
        print(f"qwen-vllm web: {exc}", file=sys.stderr)
        return 2
    demo.queue(default_concurrency_limit=args.concurrency)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            show_error=False,
            ssr_mode=False,
            quiet=True,
            prevent_thread_lock=True,
        )
    except OSError as exc:  # port taken or address not available
        print(f"qwen-vllm web: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    # Printed once the server answers (the stack itself polls the URL).
    print(f"Qwen chat web UI: http://{args.host}:{args.port}/ (API {api_base_url(args.api_url)})", flush=True)
    demo.block_thread()  # until Ctrl-C
    return 0


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("web")
