"""``qwen-vllm worker`` (``python -m qwen_vllm.worker_launch``): the FastChat worker.

Takes fschat vllm_worker's flags (--host, --port, --worker-address,
--controller-address, --model-path, --model-names, --limit-worker-concurrency,
--no-register, --num-gpus, --conv-template), --max-queued-requests, and every
flag of vLLM's own OpenAI server (its parser: --tensor-parallel-size, --dtype,
--max-model-len, --api-key, --distributed-executor-backend ray, ...), then runs
vLLM's API server with the FastChat endpoint plugin (worker/routes.py): one
process serves FastChat's worker routes, /v1/*, /health (liveness) and /ready
(readiness), admits a bounded number of generation requests
(worker/admission.py), and registers with the controller.

Differences from fschat: binds 127.0.0.1 unless --host says otherwise; the
Qwen template and stop ids apply whatever the model path is called.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from qwen_vllm.errors import QwenVLLMError
from qwen_vllm.runtime.processes import DIE_WITH_PARENT_ENV
from qwen_vllm.serving.http import WILDCARD_HOSTS, http_url

PLUGIN_GROUPS = (
    "vllm.general_plugins",
    "vllm.platform_plugins",
    "vllm.io_processor_plugins",
    "vllm.stat_logger_plugins",
)
REQUIRED_PLUGINS = ("qwen_vllm", "qwen_vllm_fastchat")


def plugin_allowlist(current: str | None) -> str:
    """VLLM_PLUGINS naming our two plugins. It is one allowlist for every plugin
    group: when unset, keep everything that loads today (all non-endpoint
    plugins) and add ours, instead of silently disabling the rest."""
    if current is None:
        names = [ep.name for group in PLUGIN_GROUPS for ep in entry_points(group=group)]
    else:
        names = current.split(",")
    return ",".join(dict.fromkeys([*names, *REQUIRED_PLUGINS]))


def served_names(model: str, model_names: list[str] | None = None, served_model_name: list[str] | None = None) -> list[str]:
    """The names a worker serves (and registers with the controller): the
    ones given, else the checkpoint directory's name as the path spells it
    (``.``, ``DIR/.`` and a trailing slash normalised; a symlink keeps its own
    name). The stack waits for exactly these."""
    if model_names and served_model_name:
        raise QwenVLLMError("give --model-names or --served-model-name, not both")
    return list(model_names or served_model_name or [Path(os.path.abspath(model)).name])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    fc = parser.add_argument_group("FastChat worker", "fschat vllm_worker's flags")
    fc.add_argument("--model-path", help="checkpoint directory (same as vLLM's --model)")
    fc.add_argument(
        "--model-names",
        type=lambda s: [n for n in s.split(",") if n],
        help="comma-separated names to serve the model as (default: the directory's name)",
    )
    fc.add_argument("--worker-address", help="URL the controller and front reach this worker at (default http://HOST:PORT)")
    fc.add_argument("--controller-address", default="http://localhost:21001", help="FastChat controller URL")
    fc.add_argument(
        "--max-queued-requests",
        type=int,
        help="generation requests that may wait beyond the --max-num-seqs running; past them a request gets "
        "429 + Retry-After (FastChat routes: 'server busy'). Default: as many as --max-num-seqs",
    )
    fc.add_argument(
        "--limit-worker-concurrency",
        type=int,
        help="FastChat's flag: at most this many generation requests running or queued (replaces "
        "--max-num-seqs + --max-queued-requests as the limit)",
    )
    fc.add_argument("--no-register", action="store_true", help="do not register with a controller")
    fc.add_argument("--num-gpus", type=int, default=1, help="tensor-parallel size (fschat's name for it)")
    fc.add_argument("--conv-template", help="FastChat conversation template (default qwen-7b-chat for chat models)")
    fc.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (413 beyond)")
    make_arg_parser(parser)
    # Qwen tool calling on by default, as with `qwen-vllm serve`.
    from qwen_vllm.checkpoints.lora import LORA_DEFAULTS
    from qwen_vllm.tools.vllm_parser import SERVER_DEFAULTS

    parser.set_defaults(
        host="127.0.0.1", port=21002, model=None, enable_server_load_tracking=True, **SERVER_DEFAULTS, **LORA_DEFAULTS
    )


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Map fschat's flags onto vLLM's and check them before any engine starts."""
    from qwen_vllm.plugin.checkpoint import is_qwen_v1
    from qwen_vllm.plugin.checks import check_before_start, check_lora_modules
    from qwen_vllm.worker.protocol import conv_template

    model = args.model_path or args.model_tag or args.model
    if not model:
        raise QwenVLLMError("--model-path is required (a Qwen checkpoint directory)")
    args.model = model
    # fschat's default name is the directory's name; vLLM's would be the whole path.
    args.served_model_name = served_names(model, args.model_names, args.served_model_name)
    if args.num_gpus > 1:
        if args.tensor_parallel_size not in (1, args.num_gpus):
            raise QwenVLLMError(
                f"--num-gpus {args.num_gpus} conflicts with --tensor-parallel-size {args.tensor_parallel_size}"
            )
        args.tensor_parallel_size = args.num_gpus
    if is_qwen_v1(model):
        args.quantization = check_before_start(
            model,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len,
            need_weights=args.load_format != "dummy",
        )
        check_lora_modules(model, args)
    if args.limit_worker_concurrency is not None and args.limit_worker_concurrency < 1:
        raise QwenVLLMError("--limit-worker-concurrency must be at least 1")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise QwenVLLMError("--max-queued-requests must be 0 or more")
    if (args.api_server_count or 1) != 1:
        raise QwenVLLMError("the FastChat worker runs one API server process (--api-server-count 1)")
    if args.worker_address is None:
        if args.host in WILDCARD_HOSTS:
            raise QwenVLLMError(
                f"--host {args.host or '(all interfaces)'} is not an address others can reach: "
                "give --worker-address http://THIS_HOST:PORT"
            )
        args.worker_address = http_url(args.host, args.port)
    if args.conv_template:
        conv_template(args.conv_template)
    return args


def run(args: argparse.Namespace) -> int:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    from qwen_vllm.runtime.cpu import apply_cpu_defaults

    try:
        resolve_args(args)
        apply_cpu_defaults(args.tensor_parallel_size)
    except QwenVLLMError as exc:
        print(f"qwen-vllm worker: error: {exc}", file=sys.stderr)
        return 2
    os.environ["VLLM_PLUGINS"] = plugin_allowlist(os.environ.get("VLLM_PLUGINS"))
    os.environ[DIE_WITH_PARENT_ENV] = "1"  # engine processes exit if this server is killed
    cli_env_setup()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The worker's whole parser (FastChat flags + vLLM's server and engine flags)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="qwen-vllm worker", description="FastChat model worker on vLLM's OpenAI API server."
    )
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("worker")
