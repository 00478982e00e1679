"""``qwen-vllm demo`` (``make demo``): the whole stack on a fixture.

Builds the scripted Qwen v1 fixture (exact Qwen-7B-Chat layout, constructed
weights whose greedy reply is a fixed sentence) once under ``demo-model/``,
then runs ``qwen-vllm stack --web`` on it: the real FastChat controller, one
worker (vLLM engine), the OpenAI API and the web UI. When everything answers
it asks one question through the OpenAI SDK, prints the streamed reply and
where to point a browser, and serves until Ctrl-C. ``--smoke`` stops after
that first reply (exit 0 only if the reply is the fixture's sentence).
Other flags go to ``qwen-vllm stack`` (``--port``, ``--web-port``, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY, make_model
from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.checkpoint import validate_checkpoint

DEFAULT_DIR = Path("demo-model/qwen-scripted-chat")
# fp32 and eager: exact greedy replies and the fastest start on a CPU.
ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]


def ensure_model(model_dir: Path) -> Path:
    """Write the scripted fixture unless a valid checkpoint is already there."""
    try:
        validate_checkpoint(model_dir)
        print(f"[demo] using the fixture model in {model_dir}", flush=True)
    except QwenCheckpointError:
        print(f"[demo] writing the scripted Qwen v1 fixture to {model_dir}", flush=True)
        make_model(model_dir, "scripted")
    return model_dir


def ask_once(api_url: str, model: str, api_key: str | None) -> str:
    """Stream one chat reply through the OpenAI SDK, echoing it as it arrives."""
    from openai import OpenAI

    client = OpenAI(base_url=api_url, api_key=api_key or "EMPTY", timeout=120)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who are you?"}], stream=True, temperature=0
    )
    print("[demo] Q: Who are you?\n[demo] A: ", end="", flush=True)
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(parts[-1], end="", flush=True)
    print(flush=True)
    return "".join(parts)


PASS_THROUGH_ARGS = True  # flags after ours go to qwen-vllm stack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help=f"fixture location (default {DEFAULT_DIR})")
    parser.add_argument("--smoke", action="store_true", help="stop after the first reply (a self-check)")


def run(args: argparse.Namespace) -> int:
    from qwen_vllm.serving import stack

    model_dir = ensure_model(args.model_dir)
    stack_parser = argparse.ArgumentParser()
    stack.add_arguments(stack_parser)
    stack_flags = getattr(args, "extra_args", [])  # --port, --web-port, ...
    stack_args = stack_parser.parse_args(["--model", str(model_dir), "--web", *stack_flags, "--", *ENGINE_ARGS])

    # The fixture's first served name (other --model flags may add models beside it).
    asked = stack_args.model_names.split(",")[0] if stack_args.model_names else model_dir.name

    def on_ready(running: stack.Stack) -> bool:
        reply = ask_once(running.api_url, asked, running.keys[0] if running.keys else None)
        if args.smoke:
            if reply != CHAT_REPLY:
                raise SystemExit(f"[demo] unexpected reply: {reply!r}")
            return False
        print(
            f"[demo] open {running.web.url} in a browser, or try:\n"
            f"  .venv/bin/qwen-vllm chat --api {running.api_url}\n"
            f"  curl {running.api_url}/chat/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{asked}", "messages": [{{"role": "user", "content": "hi"}}]}}'""",
            flush=True,
        )
        return True

    return stack.run(stack_args, on_ready=on_ready)



if __name__ == "__main__":
    from qwen_vllm.cli import run_as_module

    run_as_module("demo")
