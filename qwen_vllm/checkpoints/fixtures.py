"""Fixture checkpoints in the exact Qwen v1 layout (no model hub is reachable in tests).

``make_model(dir, kind="random")`` writes seeded random weights (for numerics);
``kind="scripted"`` writes weights *constructed* so that the greedy reply to any
ChatML prompt is a fixed sentence ending with ``<|im_end|>`` emitted by the
model itself (``CHAT_REPLY``), or, when the prompt carries Qwen's ReAct tool
instruction, a ReAct action (``REACT_ACTION``) and, after "\nThought:", the
final answer (``REACT_ANSWER``).

How the scripted model works (one decoder layer, hidden 256, 4 heads of 64):

* residual stream: dim 0 is a constant 1; dims CUR hold a 4-of-64 code of the
  current token, PREV the code of the previous token, OUT the code of the
  predicted next token (codes overlap in at most one position);
* attention head 0 ignores content: constant q/k (the c_attn bias) whose
  rotary phases make the score peak at relative offset 1, so it copies the
  previous token's CUR code into PREV (margin > 30 logits over 40k offsets);
* attention head 1 looks for the ReAct instruction's last word ("Begin", dim
  MARK of its embedding only): a constant query in the lowest-frequency rotary
  pair against a key on MARK scores it ~100 logits above every other token
  at any distance, so it copies 1 into dim FLAG after the instruction, 0
  where there is none (every other value is 0);
* the MLP has one unit per script step "(prev, cur) -> next": its gate fires
  only when both codes match (an AND built from silu and a threshold on the
  constant dim), for the two reply starts also when FLAG is set or clear,
  and writes next's code into OUT; lm_head reads OUT.

The reply is thus a lookup on the last two tokens (and FLAG at its start): the
assistant header ``assistant\\n`` starts it, every later pair continues it. A
planner re-segments reply text (non-canonically, e.g. byte pieces) wherever
two steps would share a key, so any sentence can be scripted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from qwen_vllm.checkpoints.gptq_pack import dequantize, quantize_rtn
from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.checkpoint import VOCAB_FILE
from qwen_vllm.plugin.tokenizer import (
    IM_END_ID,
    SPECIAL_START_ID,
    load_encoding,
)
from qwen_vllm.plugin.weights import LAYER_MODULES, layer_shapes

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
VOCAB_SIZE = 151936

# Qwen-7B-Chat v1.1 generation_config.json, as published.
CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 24000,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}
BASE_GENERATION_CONFIG = {
    "chat_format": "raw",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "stop_words_ids": [[151643]],
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "transformers_version": "4.31.0",
}

CHAT_REPLY = "Hello! I am the scripted Qwen fixture 🦙 and I say 你好，世界. This reply stops on its own."
REACT_ACTION = (
    'Thought: I need the current weather in Paris.\nAction: get_weather\n'
    'Action Input: {"city": "Paris", "unit": "celsius"}\nObservation:'
)
REACT_ANSWER = " I now know the final answer.\nFinal Answer: It is 22 degrees and sunny in Paris."
# The scripted replies: (prompt tail whose last two tokens start the reply, reply,
# when): ``when`` True / False starts it only if the prompt does / does not
# carry Qwen's ReAct tool instruction (tools/react.py), None in either case.
SCRIPT: list[tuple[str, str, bool | None]] = [
    ("<|im_start|>assistant\n", CHAT_REPLY, False),
    ("<|im_start|>assistant\n", REACT_ACTION, True),
    ("\nThought:", REACT_ANSWER, None),
]

# Files a real checkpoint ships for trust_remote_code; ours must never run.
_REMOTE_CODE_TRAP = (
    "raise RuntimeError('qwen-vllm fixture: {name} is remote code and must never be imported; "
    "qwen_vllm provides the config, model and tokenizer')\n"
)
REMOTE_CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py")


def qwen_tiktoken_path() -> Path:
    """The real ``qwen.tiktoken``, shipped inside the PyPI package ``dashscope``."""
    path = Path(str(resources.files("dashscope") / "resources" / VOCAB_FILE))
    if not path.is_file():
        raise QwenCheckpointError(f"{path}: missing; install the 'dashscope' package")
    return path


def qwen_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    mlp_width: int,
    *,
    seq_length: int = 8192,
    max_position_embeddings: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A Qwen v1 config.json (Qwen-7B-Chat's keys) with the given shapes.

    ``mlp_width`` is the real MLP width; config.json stores twice that.
    """
    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * mlp_width,
        "kv_channels": hidden_size // num_heads,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": max_position_embeddings or seq_length,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": VOCAB_SIZE,
    }
    cfg.update(overrides)
    return cfg


def random_weights(cfg: dict[str, Any], seed: int = 0, qk_std: float = 1.0) -> dict[str, torch.Tensor]:
    """Seeded weights with O(1) activations and non-zero biases and norm weights
    (zeros would hide a mis-mapped bias or norm). ``qk_std`` scales the q/k rows
    of c_attn (long-context fixtures need position-sensitive attention)."""
    gen = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    out = {"transformer.wte.weight": randn(v, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        for key, shape in layer_shapes(cfg).items():
            name = f"transformer.h.{i}.{key}"
            if key.startswith("ln_"):
                out[name] = 1.0 + randn(*shape, std=0.2)
            elif key.endswith("bias"):
                out[name] = randn(*shape, std=0.2)
            else:
                out[name] = randn(*shape, std=1.0 / math.sqrt(shape[1]))
        out[f"transformer.h.{i}.attn.c_attn.weight"][: 2 * h] *= qk_std
    out["transformer.ln_f.weight"] = 1.0 + randn(h, std=0.2)
    out["lm_head.weight"] = randn(v, h, std=4.0 / math.sqrt(h))
    return out


# -- scripted weights -----------------------------------------------------------
_CODE_DIMS, _CODE_BITS = 64, 4
_CONST, _CUR, _PREV, _OUT = 0, 1, 1 + _CODE_DIMS, 1 + 2 * _CODE_DIMS
_MARK, _FLAG = 1 + 3 * _CODE_DIMS, 2 + 3 * _CODE_DIMS
SCRIPTED_HIDDEN, SCRIPTED_HEADS = 256, 4
_POSITION_PAIRS, _POSITION_AMPLITUDE = 8, 30.0
_GATE_GAIN, _UP_GAIN, _OUT_GAIN = 40.0, 1.0, 1.0
_MARK_GAIN = 30.0  # |q| = |k| of head 1: score 30 * 30 / sqrt(64) = 112 logits at offset 0


@dataclass(frozen=True)
class ScriptStep:
    prev: int
    cur: int
    next: int
    when: bool | None = None  # only with / without the ReAct instruction in the prompt


def tool_marker(vocab_file: str) -> int:
    """The token that ends Qwen's ReAct instruction ("...\\n\\nBegin!"): the
    scripted model tells tool prompts by it."""
    from qwen_vllm.tools.react import REACT_INSTRUCTION

    enc = load_encoding(os.path.abspath(vocab_file))
    *_, marker, bang = enc.encode(REACT_INSTRUCTION)
    assert enc.decode([marker, bang]) == "Begin!"
    return marker


def _codes(n: int) -> list[list[int]]:
    """n distinct 4-of-64 codes, any two sharing at most one position."""
    codes: list[list[int]] = []
    used_pairs: set[tuple[int, int]] = set()
    dims = range(_CODE_DIMS)
    import itertools

    for combo in itertools.combinations(dims, _CODE_BITS):
        pairs = set(itertools.combinations(combo, 2))
        if pairs & used_pairs:
            continue
        codes.append(list(combo))
        used_pairs |= pairs
        if len(codes) == n:
            return codes
    raise QwenCheckpointError(f"scripted fixture: {n} tokens exceed the {len(codes)} codes available")


def _split_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Re-segment one token's bytes into two or more smaller tokens."""
    half = len(piece) // 2
    out: list[int] = []
    for part in (piece[:half], piece[half:]):
        out += [ranks[part]] if part in ranks else _split_piece(part, ranks)
    return out


def _splittable(enc: Any, token: int) -> bool:
    return token < SPECIAL_START_ID and len(enc.decode_single_token_bytes(token)) > 1


def plan_script(scripts: list[tuple[str, str, bool | None]], vocab_file: str) -> list[ScriptStep]:
    """Token steps for every scripted reply, with no (prev, cur) key used for
    two different steps unless one needs the ReAct instruction and the other
    its absence. Start keys come from the prompt and are fixed; reply tokens
    are split into smaller pieces until all keys are unique."""
    enc = load_encoding(os.path.abspath(vocab_file))
    ranks = enc._mergeable_ranks
    starts = [tuple(enc.encode(tail, allowed_special="all")[-2:]) for tail, _, _ in scripts]
    replies = [enc.encode(reply, allowed_special=set()) + [IM_END_ID] for _, reply, _ in scripts]
    for _ in range(1000):
        # key -> when -> (next, script, step)
        table: dict[tuple[int, int], dict[bool | None, tuple[int, int, int]]] = {}
        conflict = None
        for s, ((prev, cur), reply, (_, _, start_when)) in enumerate(zip(starts, replies, scripts)):
            for j, nxt in enumerate(reply):
                when = start_when if j == 0 else None
                steps = table.setdefault((prev, cur), {})
                clash = [o for w, o in steps.items() if (w is None or when is None or w == when) and (w, o[0]) != (when, nxt)]
                if clash:
                    conflict = [(s, j), clash[0][1:]]
                    break
                steps.setdefault(when, (nxt, s, j))
                prev, cur = cur, nxt
            if conflict:
                break
        if conflict is None:
            return [ScriptStep(p, c, n, w) for (p, c), steps in table.items() for w, (n, _, _) in steps.items()]
        # Two steps share the key made by the two tokens before them: split one of
        # those tokens (in either reply; start keys belong to the prompt) into pieces.
        for s, j in conflict:
            reply = replies[s]
            k = next((k for k in (j - 1, j - 2) if k >= 0 and _splittable(enc, reply[k])), None)
            if k is not None:
                reply[k : k + 1] = _split_piece(enc.decode_single_token_bytes(reply[k]), ranks)
                break
        else:
            raise QwenCheckpointError(f"scripted fixture: cannot make the steps of {scripts} unique")
    raise QwenCheckpointError("scripted fixture: script planning did not converge")


def scripted_weights(steps: list[ScriptStep], marker: int, num_heads: int = SCRIPTED_HEADS) -> tuple[dict, dict]:
    """(config, weights) of the one-layer lookup model described in the module
    doc; ``marker`` is the token that sets FLAG (``tool_marker``)."""
    tokens = sorted({t for s in steps for t in (s.prev, s.cur, s.next)})
    if marker in tokens:
        raise QwenCheckpointError("scripted fixture: the tool marker token must not be in a reply")
    code_of = dict(zip(tokens, _codes(len(tokens))))
    h = SCRIPTED_HIDDEN
    head_dim = h // num_heads
    width = 64 * math.ceil(len(steps) / 64)
    cfg = qwen_config(h, 1, num_heads, width)

    def code_vec(token: int, offset: int) -> torch.Tensor:
        vec = torch.zeros(h)
        vec[[offset + d for d in code_of[token]]] = 1.0 / math.sqrt(_CODE_BITS)
        return vec

    wte = torch.zeros(VOCAB_SIZE, h)
    wte[:, _CONST] = 1.0
    lm_head = torch.zeros(VOCAB_SIZE, h)
    for t in tokens:
        wte[t] += code_vec(t, _CUR)
        lm_head[t] = code_vec(t, _OUT) * 2.0
    wte[marker, _MARK] = 1.0

    # Attention: head 0 attends to the previous token and copies CUR -> PREV.
    c_attn_w = torch.zeros(3 * h, h)
    c_attn_b = torch.zeros(3 * h)
    base = cfg["rotary_emb_base"]
    half = head_dim // 2
    amp = math.sqrt(_POSITION_AMPLITUDE * math.sqrt(head_dim))
    for i in range(_POSITION_PAIRS):
        theta = base ** (-2 * i / head_dim)
        c_attn_b[i] = amp  # q = (amp, 0) in rotary pair i (neox layout: i, i + half)
        c_attn_b[h + i] = amp * math.cos(theta)  # k at angle theta -> score peaks at offset 1
        c_attn_b[h + i + half] = amp * math.sin(theta)
    # Normalised input of a script token: x / rms(x) with |x|^2 = 2 (const + code).
    norm_in = math.sqrt(h / 2.0)
    for d in range(_CODE_DIMS):
        c_attn_w[2 * h + d, _CUR + d] = 1.0 / norm_in  # v(head 0) = the token's code
    c_proj = torch.zeros(h, h)
    for d in range(_CODE_DIMS):
        c_proj[_PREV + d, d] = 1.0
    # Head 1 finds the marker (x / rms(x) with |x|^2 = 2: const + MARK, like a script
    # token) and copies 1 into FLAG. Pair half - 1 turns by at most 1.1 rad over 8192
    # offsets, so the marker keeps > 50 logits over every other token.
    pair = head_dim + half - 1
    c_attn_b[pair] = _MARK_GAIN
    c_attn_w[h + pair, _MARK] = _MARK_GAIN / norm_in
    c_attn_w[2 * h + head_dim, _MARK] = 1.0 / norm_in
    c_proj[_FLAG, head_dim] = 1.0

    # MLP: one unit per step; gate = AND(cur matches, prev matches).
    norm_mid = math.sqrt(h / 3.0)  # |x|^2 = 3 after attention (const, CUR, PREV)
    width_units = cfg["intermediate_size"] // 2
    w1 = torch.zeros(width_units, h)
    w2 = torch.zeros(width_units, h)
    mlp_out = torch.zeros(h, width_units)
    for j, step in enumerate(steps):
        w2[j] = (code_vec(step.cur, _CUR) + code_vec(step.prev, _PREV)) * _GATE_GAIN / norm_mid
        w2[j, _CONST] = -1.5 * _GATE_GAIN / norm_mid
        if step.when is True:  # FLAG is a third input of the AND
            w2[j, _FLAG] = _GATE_GAIN / norm_mid
            w2[j, _CONST] = -2.5 * _GATE_GAIN / norm_mid
        elif step.when is False:  # FLAG vetoes it
            w2[j, _FLAG] = -3.0 * _GATE_GAIN / norm_mid
        w1[j, _CONST] = _UP_GAIN / norm_mid
        mlp_out[:, j] = code_vec(step.next, _OUT) * _OUT_GAIN
    weights = {
        "transformer.wte.weight": wte,
        "transformer.h.0.ln_1.weight": torch.ones(h),
        "transformer.h.0.attn.c_attn.weight": c_attn_w,
        "transformer.h.0.attn.c_attn.bias": c_attn_b,
        "transformer.h.0.attn.c_proj.weight": c_proj,
        "transformer.h.0.ln_2.weight": torch.ones(h),
        "transformer.h.0.mlp.w1.weight": w1,
        "transformer.h.0.mlp.w2.weight": w2,
        "transformer.h.0.mlp.c_proj.weight": mlp_out,
        "transformer.ln_f.weight": torch.ones(h),
        "lm_head.weight": lm_head,
    }
    return cfg, weights


# -- GPTQ -----------------------------------------------------------------------
# The linears Qwen's Int4/Int8 checkpoints quantize (wte and lm_head stay float).
GPTQ_MODULES = tuple(m.qwen for m in LAYER_MODULES)  # every linear in a layer
_LAYER_PREFIX = re.compile(r"^transformer\.h\.\d+\.")


def gptq_quantize_config(bits: int, group_size: int) -> dict[str, Any]:
    """quantize_config.json as auto-gptq wrote it for Qwen-7B-Chat-Int4/Int8."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
    }


def gptq_weights(
    weights: dict[str, torch.Tensor], bits: int, group_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(GPTQ checkpoint tensors, the exact float32 weights they encode).

    Quantized linears become qweight/qzeros/scales/g_idx (gptq_pack); every
    other tensor is stored as float16 in the checkpoint and as the same
    float16 values, widened, in the reference.
    """
    quant: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and _LAYER_PREFIX.sub("", module) in GPTQ_MODULES:
            packed = quantize_rtn(w, bits, group_size)
            quant.update(packed.as_dict(module))
            ref[name] = dequantize(packed, bits)
        else:
            quant[name] = w.to(torch.float16)
            ref[name] = quant[name].to(torch.float32)
    return quant, ref


# -- writing --------------------------------------------------------------------
def write_model_files(
    out_dir: str | os.PathLike, cfg: dict[str, Any], *, chat: bool = True, extra_files: dict[str, str] | None = None
) -> Path:
    """Everything of a Qwen v1 directory but the weights (config, generation config,
    tokenizer files, remote-code traps): enough for vLLM's ``load_format="dummy"``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = CHAT_GENERATION_CONFIG if chat else BASE_GENERATION_CONFIG
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok_cfg = {
        "model_max_length": cfg["seq_length"],
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    src = qwen_tiktoken_path()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise QwenCheckpointError(f"{src}: sha256 {digest} is not Qwen's qwen.tiktoken")
    shutil.copyfile(src, out / VOCAB_FILE)
    for name in REMOTE_CODE_FILES:
        (out / name).write_text(_REMOTE_CODE_TRAP.format(name=name))
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out


def write_checkpoint(
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    weights: dict[str, torch.Tensor],
    *,
    chat: bool = True,
    shards: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a complete Qwen-7B-Chat-style directory: config, generation config,
    tokenizer files, sharded safetensors with index, remote-code trap files."""
    from safetensors.torch import save_file

    out = write_model_files(out_dir, cfg, chat=chat, extra_files=extra_files)
    names = list(weights)
    per_shard = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        part = names[s * per_shard : (s + 1) * per_shard]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        # Float tensors take ``dtype``; GPTQ's int32 tensors keep theirs.
        tensors = {n: (w.to(dtype) if (w := weights[n]).is_floating_point() else w).contiguous() for n in part}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def make_model(
    out_dir: str | os.PathLike,
    kind: str = "random",
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    mlp_width: int = 256,
    seq_length: int = 8192,
    qk_std: float = 1.0,
    chat: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    gptq_bits: int | None = None,
    gptq_group_size: int = 32,
    gptq_reference: str | os.PathLike | None = None,
) -> Path:
    """Write a fixture checkpoint: ``kind`` is "random" or "scripted".

    With ``gptq_bits`` (4 or 8) the linears are quantized into a GPTQ
    checkpoint laid out like Qwen-7B-Chat-Int4/Int8 (auto-gptq tensors,
    ``quantization_config`` in config.json and quantize_config.json, float16);
    ``gptq_reference`` then receives a float32 checkpoint of the exact weights
    the quantized one encodes.
    """
    if kind == "random":
        cfg = qwen_config(hidden_size, num_layers, num_heads, mlp_width, seq_length=seq_length)
        weights = random_weights(cfg, seed=seed, qk_std=qk_std)
    elif kind == "scripted":
        vocab = str(qwen_tiktoken_path())
        cfg, weights = scripted_weights(plan_script(SCRIPT, vocab), tool_marker(vocab))
    else:
        raise ValueError(f"unknown fixture kind {kind!r}; choose 'random' or 'scripted'")
    if gptq_bits is None:
        if gptq_reference is not None:
            raise ValueError("gptq_reference needs gptq_bits")
        return write_checkpoint(out_dir, cfg, weights, chat=chat, dtype=dtype)
    quant, ref = gptq_weights(weights, gptq_bits, gptq_group_size)
    if gptq_reference is not None:
        write_checkpoint(gptq_reference, cfg, ref, chat=chat, dtype=torch.float32)
    qcfg = gptq_quantize_config(gptq_bits, gptq_group_size)
    cfg = dict(cfg, fp16=True, torch_dtype="float16", quantization_config=dict(qcfg, quant_method="gptq"))
    extra = {"quantize_config.json": json.dumps(qcfg, indent=2) + "\n"}
    return write_checkpoint(out_dir, cfg, quant, chat=chat, dtype=torch.float16, extra_files=extra)


def add_arguments(parser: Any) -> None:
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--random", dest="kind", action="store_const", const="random", help="seeded random weights (default)")
    kind.add_argument(
        "--scripted",
        dest="kind",
        action="store_const",
        const="scripted",
        help="weights whose greedy reply is a fixed sentence (a ReAct tool call when given tools)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--mlp-width", type=int, default=256, help="real MLP width (config stores twice this)")
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--base", action="store_true", help="a base model (chat_format raw) instead of a chat model")
    parser.add_argument(
        "--gptq", type=int, choices=(4, 8), metavar="BITS", help="write a GPTQ Int4/Int8 checkpoint (auto-gptq layout)"
    )
    parser.add_argument("--group-size", type=int, default=32, help="GPTQ group size (-1: one group per row)")
    parser.add_argument(
        "--gptq-reference", metavar="DIR", help="also write the float32 weights the GPTQ checkpoint encodes to DIR"
    )


def run(args: Any) -> int:
    kind = args.kind or "random"
    out = make_model(
        args.out_dir,
        kind,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        mlp_width=args.mlp_width,
        seq_length=args.seq_length,
        chat=not args.base,
        gptq_bits=args.gptq,
        gptq_group_size=args.group_size,
        gptq_reference=args.gptq_reference,
    )
    quant = f" GPTQ Int{args.gptq}" if args.gptq else ""
    print(f"wrote {kind}{quant} Qwen v1 fixture to {out}")
    if args.gptq_reference:
        print(f"wrote its dequantized float32 reference to {args.gptq_reference}")
    return 0
