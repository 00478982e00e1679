"""The one Qwen v1 weight-name schema: every tensor of a checkpoint, its shape
from config.json, and the vLLM / Qwen2 modules it becomes.

Qwen v1 is Qwen2 with one K/V head per attention head: ``c_attn`` is the fused
q/k/v (with bias), ``w2`` is the gate and ``w1`` the up projection (Qwen
computes ``w1(x) * silu(w2(x))``). The model's weight mapper, the GPTQ module
names, checkpoint validation, conversion to Qwen2 and the fixture writer all
read this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LAYER_PREFIX = re.compile(r"^transformer\.h\.(\d+)\.")


@dataclass(frozen=True)
class LayerModule:
    """One linear module inside ``transformer.h.N``."""

    qwen: str  # Qwen v1 name, e.g. "attn.c_attn"
    vllm: str  # vLLM's (possibly fused) module, e.g. "self_attn.qkv_proj"
    parts: tuple[str, ...]  # the Qwen2 modules it is, in order (q/k/v for c_attn)
    stacked: int | None  # shard index in ``vllm`` when two Qwen modules share it
    bias: bool
    rows: str  # output size: "h", "3h" or "mlp" (the real MLP width)
    cols: str  # input size


LAYER_MODULES = (
    LayerModule("attn.c_attn", "self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), None, True, "3h", "h"),
    LayerModule("attn.c_proj", "self_attn.o_proj", ("self_attn.o_proj",), None, False, "h", "h"),
    LayerModule("mlp.w1", "mlp.gate_up_proj", ("mlp.up_proj",), 1, False, "mlp", "h"),
    LayerModule("mlp.w2", "mlp.gate_up_proj", ("mlp.gate_proj",), 0, False, "mlp", "h"),
    LayerModule("mlp.c_proj", "mlp.down_proj", ("mlp.down_proj",), None, False, "h", "mlp"),
)
BY_QWEN_NAME = {m.qwen: m for m in LAYER_MODULES}
LAYER_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
# Whole-model tensors: Qwen v1 name -> (vLLM / Qwen2 name, shape in "v" and "h").
MODEL_TENSORS = {
    "transformer.wte.weight": ("model.embed_tokens.weight", ("v", "h")),
    "transformer.ln_f.weight": ("model.norm.weight", ("h",)),
    "lm_head.weight": ("lm_head.weight", ("v", "h")),
}


def _sizes(cfg: dict[str, Any]) -> dict[str, int]:
    h = cfg["hidden_size"]
    return {"h": h, "3h": 3 * h, "mlp": cfg["intermediate_size"] // 2, "v": cfg["vocab_size"]}


def layer_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Float tensor shapes inside one layer (``transformer.h.N.`` removed), in
    the order Qwen's checkpoints list them."""
    s = _sizes(cfg)
    shapes: dict[str, tuple[int, ...]] = {"ln_1.weight": (s["h"],)}
    for m in LAYER_MODULES:
        if m.qwen == "mlp.w1":
            shapes["ln_2.weight"] = (s["h"],)
        shapes[f"{m.qwen}.weight"] = (s[m.rows], s[m.cols])
        if m.bias:
            shapes[f"{m.qwen}.bias"] = (s[m.rows],)
    return shapes


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every float tensor shape config.json implies, by name (layer prefix removed)."""
    s = _sizes(cfg)
    whole = {name: tuple(s[d] for d in dims) for name, (_, dims) in MODEL_TENSORS.items()}
    return {**whole, **layer_shapes(cfg)}


def vllm_mapper_fields() -> dict[str, Any]:
    """The fields of vLLM's ``WeightsMapper`` for Qwen v1 names."""
    substr = {f".{ln}.": f".{new}." for ln, new in LAYER_NORMS.items()}
    stacked = {}
    for m in LAYER_MODULES:
        if m.stacked is None:
            substr[f".{m.qwen}."] = f".{m.vllm}."
        else:
            stacked[f".{m.qwen}."] = (f".{m.vllm}.", m.stacked)
    prefix = {k.removesuffix("weight"): v.removesuffix("weight") for k, (v, _) in MODEL_TENSORS.items() if k != "lm_head.weight"}
    return {
        "orig_to_new_regex": {LAYER_PREFIX: r"model.layers.\1."},
        "orig_to_new_prefix": prefix,
        "orig_to_new_substr": substr,
        "orig_to_new_stacked": stacked,
    }


def lora_packed_modules() -> dict[str, list[str]]:
    """vLLM's ``packed_modules_mapping`` for LoRA on Qwen v1: a fused vLLM
    module -> the LoRA adapters packed into it, in shard order. ``c_attn`` is
    one Qwen module, trained as one LoRA: the fused ``qkv_proj`` takes it whole
    (exact under tensor parallelism: Qwen v1 has as many K/V heads as heads).
    ``w2`` and ``w1`` are two LoRAs, packed as gate and up."""
    packed: dict[str, list[str]] = {}
    for m in sorted(LAYER_MODULES, key=lambda m: m.stacked or 0):
        fused = m.vllm.rpartition(".")[2]
        if m.stacked is not None:
            packed.setdefault(fused, []).append(m.parts[0].rpartition(".")[2])
        elif len(m.parts) > 1:
            packed[fused] = [fused]
    return packed


def lora_renames() -> dict[str, str]:
    """Substring renames for LoRA module names: the stacked Qwen modules to the
    Qwen2 part each LoRA is (``w2`` -> ``gate_proj``, ``w1`` -> ``up_proj``);
    vLLM's rename mapper drops WeightsMapper's stacked entries."""
    return {f".{m.qwen}.": f".{m.parts[0]}." for m in LAYER_MODULES if m.stacked is not None}


def qwen2_names(name: str) -> tuple[str, ...] | None:
    """The Qwen2 tensor names one Qwen v1 tensor becomes (three for c_attn,
    split in q/k/v order), or None for a name outside the schema."""
    if name in MODEL_TENSORS:
        return (MODEL_TENSORS[name][0],)
    match = LAYER_PREFIX.match(name)
    if not match:
        return None
    rest = name[match.end() :]
    module, _, kind = rest.rpartition(".")
    prefix = f"model.layers.{match[1]}."
    if module in LAYER_NORMS and kind == "weight":
        return (f"{prefix}{LAYER_NORMS[module]}.weight",)
    m = BY_QWEN_NAME.get(module)
    if m is None or kind not in ("weight", "bias") or (kind == "bias" and not m.bias):
        return None
    return tuple(f"{prefix}{part}.{kind}" for part in m.parts)
