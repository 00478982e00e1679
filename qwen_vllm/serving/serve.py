"""``qwen-vllm serve`` / ``python -m qwen_vllm.serving.serve``: vLLM's own OpenAI API
server with Qwen tool calling on.

Same as ``python -m vllm.entrypoints.openai.api_server ARGS`` plus the flags
tool calling needs (tool_parser.SERVER_ARGS) unless ARGS already set them, and
``--host 127.0.0.1`` unless ARGS give a host (vLLM binds all interfaces).
Chat, the ChatML template and the default ChatML stops need no flags at all;
only vLLM's tool-parser selection does.
"""

from __future__ import annotations

import argparse
from typing import Any

from qwen_vllm.tools.vllm_parser import with_server_args

ROUTE_ERRORS_MIDDLEWARE = "qwen_vllm.serving.http.OpenAIRouteErrors"  # unknown routes: OpenAI-shaped 404
PASS_THROUGH_ARGS = True  # everything after "serve" goes to vLLM's own parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run vLLM's OpenAI API server (all of its arguments: --model DIR, --port, "
        "--tensor-parallel-size, ...) with Qwen tool calling enabled."
    )


def run(args: Any) -> int:
    """``vllm serve``'s own command path (so ``--api-server-count N``, data
    parallelism and headless mode work as there), with our defaults."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from qwen_vllm.runtime.cpu import apply_cpu_defaults

    cli_env_setup()
    from qwen_vllm.checkpoints.lora import LORA_DEFAULTS
    from qwen_vllm.plugin.checkpoint import is_qwen_v1
    from qwen_vllm.plugin.checks import check_lora_modules

    parser = make_arg_parser(FlexibleArgumentParser(prog="qwen-vllm serve"))
    parser.set_defaults(**LORA_DEFAULTS)
    vllm_args = parser.parse_args(vllm_argv(getattr(args, "extra_args", [])))
    model = getattr(vllm_args, "model_tag", None) or vllm_args.model
    if model and is_qwen_v1(model):
        check_lora_modules(model, vllm_args)  # adapters checked before the engine starts
    apply_cpu_defaults(vllm_args.tensor_parallel_size)  # as the worker and the wrapper do
    command = ServeSubcommand()
    command.validate(vllm_args)
    command.cmd(vllm_args)
    return 0


def vllm_argv(argv: list[str]) -> list[str]:
    """The command line ``qwen-vllm serve ARGV`` hands vLLM's parser: ARGV plus
    the tool-calling flags, the loopback host and the OpenAI-shaped 404s."""
    return [*with_loopback_default(with_server_args(argv)), "--middleware", ROUTE_ERRORS_MIDDLEWARE]


def with_loopback_default(argv: list[str]) -> list[str]:
    """``--host 127.0.0.1`` unless ``argv`` names a host: vLLM's own default
    binds every interface, ours binds this machine only."""
    if any(a == "--host" or a.startswith("--host=") for a in argv):
        return argv
    return [*argv, "--host", "127.0.0.1"]


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("serve")
