"""The ``qwen-vllm`` command. Each subcommand lives in the module that does the
work (``add_arguments(parser)`` + ``run(args)``); this file only dispatches,
importing a subcommand's module when it is chosen so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "make-model": ("qwen_vllm.fixtures", "write a fixture checkpoint in the exact Qwen v1 layout"),
    "convert-to-qwen2": ("qwen_vllm.convert", "rewrite a Qwen v1 checkpoint as Qwen2ForCausalLM"),
    "chat": ("qwen_vllm.chat_cli", "chat in the terminal: in-process (--model DIR) or with a server (--api URL)"),
    "web": ("qwen_vllm.web_ui", "web chat UI for an OpenAI-compatible server (--api-url URL)"),
    "serve": ("qwen_vllm.serve", "vLLM's OpenAI API server with Qwen tool calling enabled"),
    "worker": ("qwen_vllm.worker_launch", "FastChat model worker on vLLM's OpenAI server (FastChat + vLLM flags)"),
    "openai-api": ("qwen_vllm.openai_front", "OpenAI API in front of FastChat-controller workers"),
    "stack": ("qwen_vllm.stack", "controller + workers + OpenAI API (+ web UI) in one command"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="qwen-vllm", description="Serve Qwen (v1) chat models on current vLLM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    module = None
    for name, (mod_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(mod_name)
            module.add_arguments(sp)
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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
