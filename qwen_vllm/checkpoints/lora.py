"""make-adapter / merge-lora: PEFT LoRA adapters for Qwen v1 checkpoints.

An adapter directory is laid out as Qwen's finetune.py leaves it with the PEFT
it pins (< 0.8): ``adapter_config.json`` as PEFT 0.7.1 writes it and
``adapter_model.safetensors`` (``adapter_model.bin`` from transformers < 4.35)
holding ``base_model.model.transformer.h.N.<module>.lora_A.weight`` ``(r, in)``
and ``.lora_B.weight`` ``(out, r)``. A target names the last part of a module:
``c_proj`` is both ``attn.c_proj`` and ``mlp.c_proj``. finetune.py lists
``modules_to_save=["wte", "lm_head"]`` when it trains a base model without
Q-LoRA, but saves only the ``lora_`` tensors; PEFT itself would save them too.

``make-adapter`` writes seeded adapters with a non-zero B (a freshly initialised
PEFT adapter changes nothing); ``merge-lora`` folds one into its base:
``W' = W + (alpha / r) * B @ A`` per module, saved tensors replacing the base's.
Every name and shape comes from the schema in plugin/weights.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Container, Iterable
from pathlib import Path
from typing import Any

import torch

from qwen_vllm.errors import QwenAdapterError
from qwen_vllm.plugin.checkpoint import read_config, validate_checkpoint
from qwen_vllm.plugin.weights import (
    BY_QWEN_NAME,
    LAYER_MODULES,
    LAYER_PREFIX,
    MODEL_TENSORS,
    LayerModule,
    expected_shapes,
    layer_shapes,
)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model
TARGETS = tuple(dict.fromkeys(m.qwen.rpartition(".")[2] for m in LAYER_MODULES))  # c_attn, c_proj, w1, w2
# modules_to_save for new tokens: the (vocab, hidden) tensors, by the name PEFT matches.
SAVED_TENSORS = {
    name.removesuffix(".weight").rpartition(".")[2]: name for name, (_, dims) in MODEL_TENSORS.items() if dims == ("v", "h")
}
# Seeded values: fixtures.random_weights draws a linear's entries with std
# 1/sqrt(in). With A ~ N(0, 1/in) and B ~ N(0, c^2), an entry of s * B @ A
# (s = alpha / r) has std s * sqrt(r) * c / sqrt(in), so c = DELTA_FRACTION /
# (s * sqrt(r)) makes ||s * B @ A|| = DELTA_FRACTION * ||W|| for every module,
# rank and alpha: every logit moves, the base still dominates. Saved
# embeddings get noise of DELTA_FRACTION times their own std.
DELTA_FRACTION = 0.2


def _peft_match(module: str, target: str) -> bool:
    """PEFT's target / modules_to_save test: the name is the target or ends in ``.target``."""
    return module == target or module.endswith(f".{target}")


def target_modules(targets: Iterable[str]) -> list[LayerModule]:
    """The layer modules PEFT wraps for ``target_modules``."""
    targets = list(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise QwenAdapterError(f"unknown LoRA target(s) {unknown}; Qwen v1's linears are {list(TARGETS)}")
    return [m for m in LAYER_MODULES if any(_peft_match(m.qwen, t) for t in targets)]


def checkpoint_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every float tensor of a Qwen v1 checkpoint by full name, with the shape config.json implies."""
    out = {name: shape for name, shape in expected_shapes(cfg).items() if name in MODEL_TENSORS}
    for i in range(cfg["num_hidden_layers"]):
        out.update({f"transformer.h.{i}.{k}": shape for k, shape in layer_shapes(cfg).items()})
    return out


def adapter_shapes(cfg: dict[str, Any], rank: int, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """PEFT's key -> shape of every LoRA tensor for ``targets`` on the base ``cfg``."""
    shapes = checkpoint_shapes(cfg)
    out: dict[str, tuple[int, int]] = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in target_modules(targets):
            rows, cols = shapes[f"transformer.h.{i}.{m.qwen}.weight"]
            key = f"{PEFT_PREFIX}transformer.h.{i}.{m.qwen}"
            out[f"{key}.lora_A.weight"] = (rank, cols)
            out[f"{key}.lora_B.weight"] = (rows, rank)
    return out


def adapter_config(
    base: str, rank: int, alpha: int, targets: Iterable[str], modules_to_save: list[str] | None
) -> dict[str, Any]:
    """adapter_config.json as PEFT 0.7.1 writes it for finetune.py's LoraConfig."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
    }


def read_tensors(path: Path, names: Container[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors or torch.save'd .bin file (only ``names`` if given)."""
    if path.suffix == ".bin":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if names is None or k in names}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if names is None or k in names}


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A .bin (torch.save, as transformers < 4.35 saved adapters) or a .safetensors
    file with the metadata fixtures.write_checkpoint gives its shards."""
    if path.suffix == ".bin":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})


def _base(base: Path, need_weights: bool = True) -> tuple[list[Path], dict[str, Any]]:
    """A checked Qwen v1 base: its weight files and config.json (shapes come
    from config.json: ``need_weights=False`` takes a weightless directory, as
    ``qwen-vllm bench --size`` writes)."""
    files = validate_checkpoint(base, need_tokenizer=False, need_weights=need_weights)
    return files.weights, read_config(base)


def _config_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The dtype a Qwen v1 config.json declares (its bf16/fp16 flags)."""
    return next((t for t, flag in DTYPE_FLAGS.items() if cfg.get(flag) and t != torch.float32), torch.float32)


def _base_tensors(weights: list[Path], names: set[str]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in weights:
        found.update(read_tensors(path, names))
    return found


def make_adapter(
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int = 64,
    alpha: int = 16,
    seed: int = 0,
    targets: Iterable[str] = TARGETS,
    modules_to_save_listed: bool = False,
    with_modules_to_save: bool = False,
    bin_format: bool = False,
    strength: float = DELTA_FRACTION,
) -> Path:
    """Write a seeded LoRA adapter for the checkpoint at ``base`` (see module doc).
    ``strength``: ||s·B·A|| relative to a random linear's norm (DELTA_FRACTION);
    a constructed model with wide margins (the scripted fixture) needs more to
    change its words.

    ``modules_to_save_listed`` lists wte and lm_head in the config without their
    tensors (what finetune.py leaves); ``with_modules_to_save`` also saves them.
    A GPTQ base gets float16 tensors (as Q-LoRA trains them) with shapes from
    config.json; any other base its own float dtype.
    """
    if rank < 1 or alpha <= 0:
        raise QwenAdapterError(f"LoRA rank and alpha must be positive, got r={rank}, alpha={alpha}")
    base_dir, out_dir = Path(base), Path(out)
    weights, cfg = _base(base_dir, need_weights=with_modules_to_save)
    targets = list(targets)
    shapes = adapter_shapes(cfg, rank, targets)
    saved = list(SAVED_TENSORS) if with_modules_to_save else []
    whole = _base_tensors(weights, {SAVED_TENSORS["wte"], *(SAVED_TENSORS[m] for m in saved)})
    if "quantization_config" in cfg:
        dtype = torch.float16
    else:
        dtype = whole[SAVED_TENSORS["wte"]].dtype if whole else _config_dtype(cfg)

    gen = torch.Generator().manual_seed(seed)
    b_std = strength / (alpha / rank * math.sqrt(rank))
    tensors = {}
    for key, shape in shapes.items():
        std = 1.0 / math.sqrt(shape[1]) if ".lora_A." in key else b_std
        tensors[key] = (torch.randn(*shape, generator=gen) * std).to(dtype)
    for module in saved:
        w = whole[SAVED_TENSORS[module]].float()
        noise = torch.randn(*w.shape, generator=gen) * (DELTA_FRACTION * w.std())
        tensors[PEFT_PREFIX + SAVED_TENSORS[module]] = (w + noise).to(dtype)

    listed = list(SAVED_TENSORS) if modules_to_save_listed or with_modules_to_save else None
    out_dir.mkdir(parents=True, exist_ok=True)
    config = adapter_config(str(base), rank, alpha, targets, listed)
    # PEFT's PeftConfigMixin.save_pretrained: sorted keys, indent 2, no final newline.
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    write_tensors(tensors, out_dir / (BIN_FILE if bin_format else SAFETENSORS_FILE))
    return out_dir


def read_adapter(adapter: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors (safetensors first, as PEFT looks)."""
    root = Path(adapter)
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise QwenAdapterError(f"{cfg_path}: missing; a PEFT adapter directory needs it")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise QwenAdapterError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r}, use_dora {cfg.get('use_dora')}; only plain LoRA merges"
        )
    for name in (SAFETENSORS_FILE, BIN_FILE):
        if (root / name).is_file():
            return cfg, read_tensors(root / name)
    raise QwenAdapterError(f"{root}: no {SAFETENSORS_FILE} or {BIN_FILE}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key (a regex) matches a
    module name it equals or ends the name after a dot."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_edits(
    cfg: dict[str, Any], adapter_cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """(base weight name -> (B, A, s), base tensor name -> saved replacement)
    for an adapter on the base ``cfg``, every name and shape checked. The
    factors stay apart: a 7B model's deltas alone would not fit in memory."""
    shapes = checkpoint_shapes(cfg)
    modules = "|".join(m.qwen for m in LAYER_MODULES)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        lora = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        layer_module = LAYER_PREFIX.sub("", lora[1]) if lora else None
        if lora and layer_module in BY_QWEN_NAME and f"{lora[1]}.weight" in shapes and name != key:
            pairs.setdefault(lora[1], {})[lora[2]] = tensor
        elif name in shapes and name != key:
            _check_shape(key, tuple(tensor.shape), shapes[name], cfg, where)
            replaced[name] = tensor
        elif lora and layer_module in BY_QWEN_NAME and name != key:
            layer = int(LAYER_PREFIX.match(lora[1])[1])
            raise QwenAdapterError(
                f"{where}: {key} is for layer {layer} but the base checkpoint has {cfg['num_hidden_layers']} "
                "layers: is the adapter for another base model?"
            )
        else:
            raise QwenAdapterError(
                f"{where}: unknown tensor {key!r}; a Qwen v1 LoRA adapter holds "
                f"{PEFT_PREFIX}transformer.h.N.({modules}).lora_A/lora_B.weight for N < "
                f"{cfg['num_hidden_layers']} and saved base tensors such as {PEFT_PREFIX}{SAVED_TENSORS['wte']}"
            )
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise QwenAdapterError(f"{where}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        rank = _pattern_value(adapter_cfg.get("rank_pattern") or {}, module, adapter_cfg["r"])
        alpha = _pattern_value(adapter_cfg.get("alpha_pattern") or {}, module, adapter_cfg["lora_alpha"])
        rows, cols = shapes[f"{module}.weight"]
        _check_shape(f"{PEFT_PREFIX}{module}.lora_A.weight", tuple(ab["A"].shape), (rank, cols), cfg, where)
        _check_shape(f"{PEFT_PREFIX}{module}.lora_B.weight", tuple(ab["B"].shape), (rows, rank), cfg, where)
        scale = alpha / (math.sqrt(rank) if adapter_cfg.get("use_rslora") else rank)
        deltas[f"{module}.weight"] = (ab["B"], ab["A"], scale)
    return deltas, replaced


def _warn_unsaved_modules(where: str, adapter_cfg: dict[str, Any], replaced: dict[str, torch.Tensor], then: str) -> bool:
    """Warn when ``modules_to_save`` lists modules the adapter holds no tensors
    for (what Qwen's finetune.py leaves), saying what is done ``then``; True if so."""
    saved = [name.removesuffix(".weight") for name in replaced]
    absent = [m for m in adapter_cfg.get("modules_to_save") or [] if not any(_peft_match(n, m) for n in saved)]
    if absent:
        warnings.warn(
            f"{where}: modules_to_save lists {absent} but the adapter has no such tensors "
            f"(Qwen's finetune.py never saved them); {then}",
            stacklevel=3,
        )
    return bool(absent)


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], cfg: dict[str, Any], where: str) -> None:
    if got != want:
        raise QwenAdapterError(
            f"{where}: {key} has shape {got} but the base checkpoint implies {want} (hidden_size={cfg['hidden_size']}, "
            f"intermediate_size={cfg['intermediate_size']}, vocab_size={cfg['vocab_size']}, r from adapter_config.json): "
            "is the adapter for another base model?"
        )


# Qwen v1 config.json's dtype flags, by torch dtype.
DTYPE_FLAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def merge_lora(
    base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write ``base`` with ``adapter`` merged into ``out``: the same files and
    weight file names, so it serves as a plain Qwen v1 checkpoint. Weights keep
    the base's dtype unless ``dtype`` is given: a bf16 checkpoint rounds W + s·B·A
    to bf16, which unmerged serving does not (float32 keeps the merge exact)."""
    base_dir, out_dir = Path(base), Path(out)
    weights, cfg = _base(base_dir)
    if "quantization_config" in cfg:
        raise QwenAdapterError(
            f"{base_dir}: Q-LoRA adapters cannot be merged into a GPTQ checkpoint; serve them unmerged"
        )
    if out_dir.exists() and out_dir.resolve() == base_dir.resolve():
        raise QwenAdapterError(f"{out_dir}: is the base checkpoint; merge into another directory")
    adapter_cfg, tensors = read_adapter(adapter)
    deltas, replaced = adapter_edits(cfg, adapter_cfg, tensors, str(adapter))
    _warn_unsaved_modules(str(adapter), adapter_cfg, replaced, "keeping the base checkpoint's")
    shutil.copytree(base_dir, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*(p.name for p in weights)))
    pending = set(deltas) | set(replaced)
    for path in weights:
        state = read_tensors(path)
        for name, w in state.items():
            if name in replaced:
                state[name] = replaced[name].to(dtype or w.dtype).contiguous()
            elif name in deltas:
                b, a, scale = deltas[name]
                state[name] = (w.float() + (b.float() @ a.float()) * scale).to(dtype or w.dtype)
            elif dtype is not None and w.is_floating_point():
                state[name] = w.to(dtype)
        pending -= state.keys()
        write_tensors(state, out_dir / path.name)
    if pending:
        raise QwenAdapterError(f"{base_dir}: has no tensors {sorted(pending)}, which the adapter changes")
    if dtype is not None:
        flags = {flag: t == dtype for t, flag in DTYPE_FLAGS.items()}
        config = {**cfg, **flags, "torch_dtype": str(dtype).removeprefix("torch.")}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# vLLM's --max-lora-rank values (vllm/config/lora.py MaxLoRARanks); Qwen's
# finetune.py trains r=64, so served adapters need at least 64.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 64
DEFAULT_MAX_LORAS = 4  # distinct adapters in one batch (vLLM's default is 1)
# Engine defaults of every server and the wrapper (vLLM's own: rank 16, one adapter).
LORA_DEFAULTS = {"max_lora_rank": DEFAULT_MAX_LORA_RANK, "max_loras": DEFAULT_MAX_LORAS}


def serving_dir(base: str | os.PathLike, adapter: str | os.PathLike, max_lora_rank: int) -> Path:
    """The directory to hand vLLM for serving ``adapter`` unmerged on ``base``,
    after checking what vLLM would find only while loading it, or never: every
    tensor name and shape against the base's config.json (an adapter for
    another base, a module Qwen v1 lacks), the rank against ``max_lora_rank``,
    LoRA bias, and ``modules_to_save``. Tensors for wte/lm_head cannot be
    applied unmerged: QwenAdapterError saying how to merge. Listed but absent
    (what finetune.py saves): PEFT serves the base embeddings then, and so
    does this -- through a copy of the config without the list, which vLLM
    would refuse."""
    base, adapter = Path(base), Path(adapter)
    _, cfg = _base(base, need_weights=False)
    adapter_cfg, tensors = read_adapter(adapter)
    where = str(adapter)
    if adapter_cfg.get("bias", "none") != "none":
        raise QwenAdapterError(f"{where}: bias {adapter_cfg['bias']!r} (LoRA bias terms) cannot be served; train with bias 'none'")
    deltas, replaced = adapter_edits(cfg, adapter_cfg, tensors, where)
    if not deltas:
        raise QwenAdapterError(f"{where}: holds no lora_A/lora_B tensors")
    rank = max(b.shape[1] for b, _, _ in deltas.values())
    if rank > max_lora_rank:
        allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
        raise QwenAdapterError(
            f"{where}: LoRA rank {rank} is above the engine's max_lora_rank {max_lora_rank}; "
            f"start it with --max-lora-rank {allowed[0] if allowed else rank} (vLLM allows {list(VLLM_MAX_LORA_RANKS)})"
        )
    if replaced:
        names = sorted(name.removesuffix(".weight") for name in replaced)
        raise QwenAdapterError(
            f"{where}: trains {names} in full (modules_to_save); vLLM applies only LoRA deltas, so serve it merged: "
            f"qwen-vllm merge-lora {base} {adapter} OUT_DIR, then serve OUT_DIR"
        )
    if not _warn_unsaved_modules(where, adapter_cfg, replaced, "serving it with the base checkpoint's, as PEFT does"):
        return adapter
    digest = hashlib.sha256(str(adapter.resolve()).encode()).hexdigest()[:16]
    shadow = Path(tempfile.gettempdir()) / f"qwen-vllm-adapter-{digest}"
    shadow.mkdir(exist_ok=True)
    (shadow / CONFIG_FILE).write_text(json.dumps({**adapter_cfg, "modules_to_save": None}, indent=2, sort_keys=True))
    for name in (SAFETENSORS_FILE, BIN_FILE):
        link = shadow / name
        if (adapter / name).is_file() and not link.exists():
            link.symlink_to((adapter / name).resolve())
    return shadow


class MakeAdapter:
    """``qwen-vllm make-adapter`` (a cli.Subcommand)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("base", help="Qwen v1 checkpoint directory the adapter is for")
        parser.add_argument("out", help="adapter directory to write (created if missing)")
        parser.add_argument("--rank", type=int, default=64, help="LoRA rank r")
        parser.add_argument("--alpha", type=int, default=16, help="lora_alpha; the update is scaled by alpha / r")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated target modules (default: all)")
        parser.add_argument(
            "--modules-to-save-listed", action="store_true", help="list wte and lm_head in modules_to_save, save no tensors"
        )
        parser.add_argument(
            "--with-modules-to-save", action="store_true", help="list and save perturbed wte and lm_head tensors"
        )
        parser.add_argument("--bin", action="store_true", help="adapter_model.bin (torch.save) instead of safetensors")
        parser.add_argument(
            "--strength", type=float, default=DELTA_FRACTION, help="||s·B·A|| relative to a random linear's norm"
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        out = make_adapter(
            args.base,
            args.out,
            rank=args.rank,
            alpha=args.alpha,
            seed=args.seed,
            targets=[t.strip() for t in args.targets.split(",") if t.strip()],
            modules_to_save_listed=args.modules_to_save_listed,
            with_modules_to_save=args.with_modules_to_save,
            bin_format=args.bin,
            strength=args.strength,
        )
        print(f"wrote LoRA adapter (r={args.rank}, alpha={args.alpha}) for {args.base} to {out}")
        return 0


class MergeLora:
    """``qwen-vllm merge-lora`` (a cli.Subcommand)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("base", help="Qwen v1 checkpoint directory")
        parser.add_argument("adapter", help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.*)")
        parser.add_argument("out", help="directory for the merged checkpoint")
        parser.add_argument(
            "--dtype",
            choices=[str(t).removeprefix("torch.") for t in DTYPE_FLAGS],
            help="weights' dtype (default: the base's; float32 keeps the merge exact)",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        out = merge_lora(args.base, args.adapter, args.out, getattr(torch, args.dtype) if args.dtype else None)
        print(f"wrote {args.base} with {args.adapter} merged to {out}")
        return 0
