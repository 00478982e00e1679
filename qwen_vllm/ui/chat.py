"""Terminal chat: ``qwen-vllm chat --model DIR`` (in-process vLLMWrapper) or
``qwen-vllm chat --api URL`` (any OpenAI-compatible server, e.g. the stack).

One REPL, two backends that both stream text deltas. The commands are those
of Qwen's cli_demo, fixed: ``:conf`` changes the settings actually used for
the next reply (Qwen's changed a config nobody read) and parses values with a
typed table instead of ``eval``; Ctrl-C stops the current reply and keeps
what was shown, instead of dropping the turn or ending the program.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

import openai

from qwen_vllm.chat_template import DEFAULT_SYSTEM
from qwen_vllm.errors import QwenVLLMError
from qwen_vllm.settings import SETTINGS, UI_SETTINGS, openai_params, parse_assignments
from qwen_vllm.ui.client import (
    DEFAULT_TIMEOUT,
    chat_messages,
    describe_api_error,
    list_models,
    make_client,
)

History = list[tuple[str, str]]

HELP = """\
Type a message and press Enter to chat. Ctrl-C stops a reply; Ctrl-D or :exit quits.
Commands:
  :help, :h                  show this help
  :exit, :quit, :q           leave
  :clear, :cl                clear the screen
  :clear-history, :clh       forget the conversation
  :history, :his             show the conversation
  :system [TEXT]             show or set the system prompt (used from the next reply)
  :seed [N|none]             show or set the sampling seed (same seed, same reply)
  :conf [key=value ...]      show or change generation settings, e.g. :conf temperature=0.7 top_p=0.9
  :reset-conf                back to the model's settings and the start-up seed
  :model [NAME]              list the served models and LoRA adapters, or switch to one
A line starting with '::' is sent as a message starting with ':'."""


class ChatAPIError(QwenVLLMError):
    """The OpenAI-compatible server failed or refused; the message says how."""


class Backend(Protocol):
    description: str
    model: str | None  # what replies come from: a served model or adapter name
    # For :conf listings: settings applied when the person has not changed
    # them, and what applies to the others.
    defaults: dict[str, Any]
    unset_label: str

    def stream(self, query: str, history: History, system: str, settings: dict[str, Any]) -> Iterator[str]:
        """Yield the reply's new text piece by piece; closing it abandons the request."""

    def models(self) -> list[str]:
        """What ``model`` may be set to: the served model(s), then LoRA adapters."""


class WrapperBackend:
    """vLLM in this process, through vLLMWrapper.chat_stream; ``adapters``
    (name -> PEFT directory) are served unmerged beside the base model."""

    def __init__(self, model_dir: str, adapters: dict[str, str] | None = None, **engine_kwargs: Any) -> None:
        from qwen_vllm.runtime.processes import OWN_PROCESS_GROUP_ENV
        from qwen_vllm.wrapper.chat import vLLMWrapper

        # Ctrl-C must stop a reply, not the engine: see OWN_PROCESS_GROUP_ENV.
        os.environ[OWN_PROCESS_GROUP_ENV] = "1"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # a chat, not a server log
        self.wrapper = vLLMWrapper(model_dir, adapters=adapters, **engine_kwargs)  # adapters checked before the engine
        self.base = os.path.basename(os.path.normpath(model_dir))
        self.model: str | None = self.base
        self.description = f"in-process vLLM, model {model_dir}"
        if (kv := self.wrapper.llm.llm_engine.vllm_config.cache_config.cache_dtype) != "auto":
            self.description += f", KV cache {kv}"
        self.defaults = {k: v for k, v in self.wrapper.generation_config.items() if k in UI_SETTINGS}
        self.unset_label = "(vLLM default)"

    def models(self) -> list[str]:
        return [self.base, *self.wrapper.adapters]

    def stream(self, query: str, history: History, system: str, settings: dict[str, Any]) -> Iterator[str]:
        adapter = None if self.model == self.base else self.model
        return self.wrapper.chat_stream(query, history, system=system, delta=True, adapter=adapter, **settings)


class ApiBackend:
    """An OpenAI-compatible server, streaming through the openai SDK."""

    def __init__(
        self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.client = make_client(url, api_key, timeout)
        self.url = str(self.client.base_url).rstrip("/")
        self.model = model
        self.description = f"API {self.url}"
        self.defaults: dict[str, Any] = {}
        self.unset_label = "(server default)"

    def models(self) -> list[str]:
        """GET /v1/models: the stack lists each LoRA adapter as a model of its own."""
        try:
            return list_models(self.client)
        except openai.OpenAIError as exc:
            raise ChatAPIError(describe_api_error(exc, self.url)) from exc

    def resolve_model(self) -> str:
        """The model to ask: --api-model, else the first one the server lists."""
        if not self.model:
            models = self.models()
            if not models:
                raise ChatAPIError(f"no model is served at {self.url} yet (GET /v1/models lists none): start a worker")
            self.model = models[0]
        return self.model

    def stream(self, query: str, history: History, system: str, settings: dict[str, Any]) -> Iterator[str]:
        model = self.resolve_model()
        turns = [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))]
        messages = chat_messages(system, [*turns, {"role": "user", "content": query}])
        try:
            with self.client.chat.completions.create(
                model=model, messages=messages, stream=True, **openai_params(settings)
            ) as stream:  # closing it (also when this generator is closed) aborts the request
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.OpenAIError as exc:
            raise ChatAPIError(describe_api_error(exc, self.url)) from exc


class ChatRepl:
    """The read-chat loop; all commands, one conversation."""

    def __init__(
        self,
        backend: Backend,
        *,
        system: str = DEFAULT_SYSTEM,
        seed: int | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.backend = backend
        self.system = system
        self.start_conf: dict[str, Any] = {} if seed is None else {"seed": seed}
        self.conf = dict(self.start_conf)
        self.history: History = []
        self.out = out or sys.stdout

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    # -- loop --------------------------------------------------------------------
    def run(self) -> int:
        self.say(f"Qwen chat ({self.backend.description}). :help lists commands; Ctrl-C stops a reply, :exit quits.")
        while True:
            try:
                line = input("\nUser> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say("\n(Ctrl-C stops a reply; :exit or Ctrl-D quits)")
                continue
            line = line.strip()
            if line.startswith("::"):
                self.turn(line[1:])
            elif line.startswith(":"):
                if not self.command(line):
                    return 0
            elif line:
                self.turn(line)

    def turn(self, query: str) -> None:
        self.say("Qwen: ", end="")
        try:
            reply, stopped = self._consume(self.backend.stream(query, self.history, self.system, dict(self.conf)))
        except QwenVLLMError as exc:
            self.say(f"\nerror: {exc}")
            return
        self.say(" [stopped]" if stopped else "")
        self.history.append((query, reply))

    def _consume(self, deltas: Iterator[str]) -> tuple[str, bool]:
        """Print deltas until done or Ctrl-C; returns (text shown, stopped).

        The first Ctrl-C stops at the next piece of text (a safe point: the
        engine loop is never interrupted mid-step); a second one stops at once.
        Either way the stream is closed, which aborts the request.
        """
        stopped = False

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal stopped
            if stopped:
                raise KeyboardInterrupt
            stopped = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        parts: list[str] = []
        try:
            for delta in deltas:
                parts.append(delta)
                self.say(delta, end="")
                if stopped:
                    break
        except KeyboardInterrupt:
            stopped = True
        finally:
            signal.signal(signal.SIGINT, previous)
            close = getattr(deltas, "close", None)
            if close is not None:
                close()
        return "".join(parts), stopped

    # -- commands ----------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a ``:command``; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handler = _COMMANDS.get(name)
        if handler is None:
            self.say(f"unknown command {name!r}: :help lists commands ('::' sends a line starting with ':')")
            return True
        if handler == "exit":
            return False
        try:
            getattr(self, "cmd_" + handler)(arg)
        except QwenVLLMError as exc:
            self.say(f"error: {exc}")
        return True

    def cmd_help(self, arg: str) -> None:
        self.say(HELP)

    def cmd_clear(self, arg: str) -> None:
        self.say("\033[H\033[2J", end="")

    def cmd_clear_history(self, arg: str) -> None:
        self.history.clear()
        self.say("conversation forgotten")

    def cmd_history(self, arg: str) -> None:
        if not self.history:
            self.say("(no conversation yet)")
        for i, (query, reply) in enumerate(self.history, 1):
            self.say(f"[{i}] User: {query}\n    Qwen: {reply}")

    def cmd_system(self, arg: str) -> None:
        if arg:
            self.system = arg
            self.say(f"system prompt set: {arg}")
        else:
            self.say(f"system prompt: {self.system}")

    def cmd_seed(self, arg: str) -> None:
        if arg.lower() == "none":
            self.conf.pop("seed", None)
        elif arg:
            self.conf["seed"] = SETTINGS["seed"].parse(arg)
        self.say(f"seed = {self.conf.get('seed', 'none (random)')}")

    def cmd_conf(self, arg: str) -> None:
        if arg:
            changed = parse_assignments(arg.split())  # all valid, or nothing changes
            self.conf.update(changed)
            self.say("set " + ", ".join(f"{k}={v}" for k, v in changed.items()))
            return
        width = max(map(len, UI_SETTINGS))
        for name, setting in UI_SETTINGS.items():
            if name in self.conf:
                value = f"{self.conf[name]} (set)"
            elif name in self.backend.defaults:
                value = f"{self.backend.defaults[name]} (model default)"
            else:
                value = self.backend.unset_label
            self.say(f"  {name:<{width}}  {value:<24}  {setting.describe():<22}  {setting.help}".rstrip())

    def cmd_reset_conf(self, arg: str) -> None:
        self.conf = dict(self.start_conf)
        self.say("settings reset to the model's defaults")

    def cmd_model(self, arg: str) -> None:
        served = self.backend.models()
        if arg:
            if arg not in served:
                raise ChatAPIError(f"{arg!r} is not served here; served: {', '.join(served) or 'none'}")
            self.backend.model = arg
            self.say(f"model set: {arg} (from the next reply; the conversation is kept)")
            return
        for name in served:
            self.say(f"{'*' if name == self.backend.model else ' '} {name}")


_COMMANDS = {
    **dict.fromkeys((":help", ":h"), "help"),
    **dict.fromkeys((":exit", ":quit", ":q"), "exit"),
    **dict.fromkeys((":clear", ":cl"), "clear"),
    **dict.fromkeys((":clear-history", ":clear-his", ":clh"), "clear_history"),
    **dict.fromkeys((":history", ":his"), "history"),
    ":system": "system",
    ":seed": "seed",
    ":conf": "conf",
    ":reset-conf": "reset_conf",
    ":model": "model",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", "-c", "--checkpoint-path", metavar="DIR", help="Qwen checkpoint to run in this process (vLLMWrapper)"
    )
    source.add_argument("--api", metavar="URL", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help=f"system prompt (default {DEFAULT_SYSTEM!r})")
    parser.add_argument("-s", "--seed", type=int, default=None, help="sampling seed for every reply (default random)")
    api = parser.add_argument_group("with --api")
    api.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY or none)")
    api.add_argument("--api-model", default=None, help="served model name (default: the first in /v1/models)")
    api.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds the server may stay silent")
    eng = parser.add_argument_group("with --model (vLLM engine)")
    eng.add_argument("--dtype", default="auto", help="weights dtype (default auto: the checkpoint's flag, else bf16 on GPUs and CPUs with native bf16, float32 on other CPUs)")
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    eng.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    eng.add_argument("--enforce-eager", action="store_true", help="skip graph capture (faster start)")
    eng.add_argument(
        "--kv-cache-dtype", default="auto", help="KV cache dtype (default auto: the model's; fp8 halves the cache)"
    )
    eng.add_argument(
        "--lora-modules", nargs="+", type=_name_path, default=[], metavar="NAME=PATH",
        help="LoRA adapters (PEFT directories, e.g. from Qwen's finetune.py) to serve beside the model; :model switches",
    )  # fmt: skip


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _backend(args: argparse.Namespace) -> Backend:
    if args.seed is not None:
        SETTINGS["seed"].check(args.seed)
    if args.api:
        backend = ApiBackend(args.api, args.api_key, args.api_model, args.timeout)
        try:
            backend.description += f", model {backend.resolve_model()}"
        except ChatAPIError as exc:  # the server may come up later: each reply retries
            print(f"warning: {exc}", flush=True)
        return backend
    print(f"Loading {args.model} (starting a vLLM engine takes a while)...", flush=True)
    engine = dict(dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
                  kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    return WrapperBackend(args.model, dict(args.lora_modules), **engine)


def run(args: argparse.Namespace) -> int:
    try:
        backend = _backend(args)
    except ValueError as exc:  # bad URL, seed or checkpoint (QwenCheckpointError is a ValueError)
        print(f"qwen-vllm chat: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    return ChatRepl(backend, system=args.system, seed=args.seed).run()


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("chat")
