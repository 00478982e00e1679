"""Checks on a Qwen v1 checkpoint directory, so a broken one fails with the
name of the missing file or bad field instead of deep inside vLLM."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.weights import LAYER_PREFIX, expected_shapes

VOCAB_FILE = "qwen.tiktoken"  # Qwen v1's tokenizer file, beside config.json
CHAT_FORMATS = ("chatml", "raw")


@dataclass(frozen=True)
class CheckpointFiles:
    config: Path
    weights: list[Path]
    vocab: Path | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QwenCheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise QwenCheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json as a dict; a clear error if it is missing."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise QwenCheckpointError(f"{path}: missing; a checkpoint directory needs config.json")
    return _read_json(path)


def is_qwen_v1(model_dir: str | os.PathLike) -> bool:
    """True for a local directory holding a Qwen v1 (model_type "qwen") config."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    try:
        return _read_json(path).get("model_type") == "qwen"
    except QwenCheckpointError:
        return False


def read_generation_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """generation_config.json (empty if absent), with chat_format checked."""
    path = Path(model_dir) / "generation_config.json"
    gen = _read_json(path) if path.is_file() else {}
    fmt = gen.get("chat_format", "chatml")
    if fmt not in CHAT_FORMATS:
        raise QwenCheckpointError(
            f"{path}: unknown chat_format {fmt!r}; Qwen v1 uses one of {CHAT_FORMATS}"
        )
    return gen


def validate_checkpoint(
    model_dir: str | os.PathLike, *, need_tokenizer: bool = True, need_weights: bool = True
) -> CheckpointFiles:
    """Check that a Qwen v1 directory has config.json, weights and qwen.tiktoken.

    ``need_weights=False`` accepts a weightless directory (vLLM's ``load_format="dummy"``:
    real shapes, random weights, as ``qwen-vllm bench --size`` writes)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise QwenCheckpointError(f"{root}: not a directory (qwen-vllm serves local checkpoint directories)")
    cfg_path = root / "config.json"
    cfg = read_config(root)
    if cfg.get("model_type") != "qwen":
        raise QwenCheckpointError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'qwen' (a Qwen v1 checkpoint)"
        )
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        weights = [root / n for n in shard_names]
        missing = [p.name for p in weights if not p.is_file()]
        if missing or not weights:
            raise QwenCheckpointError(f"{index}: lists weight files that are missing: {missing or 'none listed'}")
    else:
        weights = sorted(root.glob("*.safetensors"))
        if not weights:
            bins = sorted(root.glob("pytorch_model*.bin"))
            if not bins and need_weights:
                raise QwenCheckpointError(
                    f"{root}: no weights (*.safetensors with model.safetensors.index.json, or pytorch_model*.bin)"
                )
            weights = bins
    vocab = root / VOCAB_FILE
    if need_tokenizer and not vocab.is_file():
        raise QwenCheckpointError(f"{vocab}: missing; Qwen v1's tokenizer needs {VOCAB_FILE}")
    files = CheckpointFiles(cfg_path, weights, vocab if vocab.is_file() else None)
    _check_config_fields(cfg, cfg_path)
    check_checkpoint_shapes(files, cfg)
    return files


def _check_config_fields(cfg: dict[str, Any], path: Path) -> None:
    """The fields config.json must carry; QWenConfig checks their consistency."""
    from qwen_vllm.plugin.config import QWenConfig

    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing:
        raise QwenCheckpointError(f"{path}: missing or non-integer fields {missing}")
    try:
        QWenConfig.from_dict(dict(cfg))
    except QwenCheckpointError as exc:
        raise QwenCheckpointError(f"{path}: {str(exc).removeprefix('config.json: ')}") from exc


def check_weight_shape(name: str, shape: tuple[int, ...], cfg: dict[str, Any], where: str = "") -> None:
    """Raise QwenCheckpointError if tensor ``name`` disagrees with config.json."""
    want = expected_shapes(cfg).get(LAYER_PREFIX.sub("", name))
    if want is not None and tuple(shape) != want:
        raise QwenCheckpointError(
            f"{where or 'checkpoint'}: weight {name!r} has shape {tuple(shape)} but config.json implies {want} "
            f"(hidden_size={cfg['hidden_size']}, intermediate_size={cfg['intermediate_size']}, "
            f"vocab_size={cfg['vocab_size']})"
        )


def check_checkpoint_shapes(files: CheckpointFiles, cfg: dict[str, Any]) -> None:
    """Compare every safetensors header with config.json (reads headers only)."""
    from safetensors import safe_open

    for path in files.weights:
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                check_weight_shape(name, tuple(f.get_slice(name).get_shape()), cfg, where=str(path))
