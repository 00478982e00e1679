"""The ``qwen-vllm`` command. Each subcommand lives in the module that does the
work (a :class:`Subcommand`: ``add_arguments(parser)`` + ``run(args)``); this
file only dispatches, importing a subcommand's module when it is chosen so
``--help`` stays fast. ``python -m MODULE`` of such a module is the same
command (:func:`run_as_module`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Protocol

from qwen_vllm.errors import QwenVLLMError


class Subcommand(Protocol):
    """What a subcommand module provides (cf. vLLM's ``CLISubcommand``), or an
    object in it named after a colon (``module:Name``) when one module does two
    commands. One with ``PASS_THROUGH_ARGS = True`` gets the arguments it does
    not know as ``args.extra_args`` (for another program's parser)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "make-model": ("qwen_vllm.checkpoints.fixtures", "write a fixture checkpoint in the exact Qwen v1 layout"),
    "convert-to-qwen2": ("qwen_vllm.checkpoints.convert", "rewrite a Qwen v1 checkpoint as Qwen2ForCausalLM"),
    "make-adapter": ("qwen_vllm.checkpoints.lora:MakeAdapter", "write a seeded PEFT LoRA adapter for a Qwen v1 checkpoint"),
    "merge-lora": ("qwen_vllm.checkpoints.lora:MergeLora", "merge a PEFT LoRA adapter into a Qwen v1 checkpoint"),
    "chat": ("qwen_vllm.ui.chat", "chat in the terminal: in-process (--model DIR) or with a server (--api URL)"),
    "web": ("qwen_vllm.ui.web", "web chat UI for an OpenAI-compatible server (--api-url URL)"),
    "serve": ("qwen_vllm.serving.serve", "vLLM's OpenAI API server with Qwen tool calling enabled"),
    "worker": ("qwen_vllm.worker_launch", "FastChat model worker on vLLM's OpenAI server (FastChat + vLLM flags)"),
    "openai-api": ("qwen_vllm.serving.front", "OpenAI API in front of FastChat-controller workers"),
    "stack": ("qwen_vllm.serving.stack", "controller + workers + OpenAI API (+ web UI) in one command"),
    "bench": ("qwen_vllm.bench.report", "performance report: profile, versus (transformers, native vLLM), cpu-defaults, lora, quant, admission, chaos"),
    "demo": ("qwen_vllm.serving.demo", "the whole stack and web UI on a scripted fixture model (make demo)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, Subcommand | None]:
    parser = argparse.ArgumentParser(prog="qwen-vllm", description="Serve Qwen (v1) chat models on current vLLM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    module = None
    for name, (target, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod_name, _, attr = target.partition(":")
            module = importlib.import_module(mod_name)
            module = getattr(module, attr) if attr else module
            module.add_arguments(sp)
            # Another program's flags pass through whole: `demo --model X` is the stack's
            # --model, not an abbreviation of demo's own --model-dir.
            sp.allow_abbrev = not getattr(module, "PASS_THROUGH_ARGS", False)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if module is None:
        parser.print_help()
        return 2
    if extra:
        # A subcommand that wraps another program's parser takes the rest as-is.
        if not getattr(module, "PASS_THROUGH_ARGS", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra_args = extra
    try:
        return int(module.run(args) or 0)
    except QwenVLLMError as exc:  # a check failed: the message says what to change
        print(f"qwen-vllm {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run_as_module(command: str) -> NoReturn:
    """``python -m <a subcommand's module> ARGS`` = ``qwen-vllm <command> ARGS``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
