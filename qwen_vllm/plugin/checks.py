"""The one pre-start check: everything a Qwen v1 checkpoint and engine
settings are checked for before an engine starts, for the wrapper and the
worker (the stack runs the worker's on every worker command line before it
starts anything). vLLM's own config hook (``engine_config``) repeats the
engine-side part for entry points that bypass these (``vllm serve``)."""

from __future__ import annotations

import argparse
import os

from qwen_vllm.plugin.checkpoint import read_config, validate_checkpoint
from qwen_vllm.plugin.ntk import LongContextFlags
from qwen_vllm.plugin.quantization import check_engine_settings, engine_quantization


def check_max_model_len(model_dir: str | os.PathLike, max_model_len: int | None) -> None:
    """Refuse a max_model_len the checkpoint in ``model_dir`` cannot serve
    (QwenContextError naming both lengths). Default: seq_length; up to 32768
    opts into Qwen's long context."""
    LongContextFlags.of(read_config(model_dir)).check_max_model_len(max_model_len)


def check_lora_modules(model_dir: str | os.PathLike, args: argparse.Namespace) -> None:
    """vLLM's ``--lora-modules`` for a server on ``model_dir``: each adapter
    checked against the checkpoint (checkpoints/lora.py ``serving_dir``: names,
    shapes, rank, modules_to_save) and its path replaced by the directory to
    serve; LoRA is enabled when adapters are given."""
    from qwen_vllm.checkpoints.lora import serving_dir

    modules = getattr(args, "lora_modules", None) or []
    if modules:
        args.enable_lora = True
    for module in modules:
        module.path = str(serving_dir(model_dir, module.path, args.max_lora_rank))


def check_before_start(
    model_dir: str | os.PathLike,
    *,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    need_weights: bool = True,
) -> str | None:
    """Raise a QwenVLLMError naming what is wrong and what would work; return
    the ``quantization`` to give vLLM ("gptq" when the checkpoint declares it
    only in quantize_config.json)."""
    validate_checkpoint(model_dir, need_weights=need_weights)
    check_max_model_len(model_dir, max_model_len)
    quantization = engine_quantization(model_dir, quantization)
    check_engine_settings(
        model_dir, quantization=quantization, kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tensor_parallel_size
    )
    return quantization
