"""convert-to-qwen2: rewrite a Qwen v1 checkpoint as an equivalent ``Qwen2ForCausalLM``.

For users on stock transformers / vLLM / SGLang (no plugin needed), and as the
independent reference our numerics tests compare against. The tokenizer is
converted to a fast ``tokenizer.json`` (same ids, NFC, Qwen's regex, the 208
specials at 151643+) with the ChatML template.

Long-context tricks (dynamic NTK, LogN) have no Qwen2 equivalent: the
converted model matches Qwen v1 exactly only up to ``seq_length``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.checkpoint import VOCAB_FILE, read_config, validate_checkpoint
from qwen_vllm.plugin.tokenizer import (
    ENDOFTEXT,
    IM_END,
    PAT_STR,
    SPECIAL_TOKENS,
)
from qwen_vllm.plugin.weights import qwen2_names


def qwen2_config(v1: dict) -> dict:
    """The Qwen2 config.json equivalent to a Qwen v1 config.json."""
    heads = v1["num_attention_heads"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": v1["hidden_size"],
        "intermediate_size": v1["intermediate_size"] // 2,
        "num_hidden_layers": v1["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": v1["hidden_size"] // heads,
        "hidden_act": "silu",
        "rms_norm_eps": v1.get("layer_norm_epsilon", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(v1.get("rotary_emb_base", 10000))},
        "max_position_embeddings": v1.get("seq_length", v1["max_position_embeddings"]),
        "vocab_size": v1["vocab_size"],
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    }


def qwen2_tensors(name: str, tensor: torch.Tensor, hidden: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen v1 tensor -> Qwen2 tensor(s) (plugin/weights.py); c_attn splits into q, k, v."""
    names = qwen2_names(name)
    if names is None:
        raise QwenCheckpointError(f"convert-to-qwen2: unexpected tensor {name!r} (GPTQ checkpoints are not converted)")
    parts = tensor.split(hidden, dim=0) if len(names) > 1 else (tensor,)
    for new, part in zip(names, parts, strict=True):
        yield new, part.contiguous()


def write_fast_tokenizer(vocab_file: Path, dst: Path, chat_template: str, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json reproducing QWenTokenizer's ids."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=PAT_STR, extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    backend.normalizer = normalizers.NFC()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
        chat_template=chat_template,
    )
    fast.save_pretrained(str(dst))


def convert_to_qwen2(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the Qwen2ForCausalLM checkpoint equivalent to the Qwen v1 one at ``src``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen_vllm.chat_template import CHATML_JINJA

    src, dst = Path(src), Path(dst)
    files = validate_checkpoint(src)
    v1 = read_config(src)
    if "quantization_config" in v1:
        raise QwenCheckpointError(f"{src}/config.json: quantized checkpoints cannot be converted")
    dst.mkdir(parents=True, exist_ok=True)
    hidden = v1["hidden_size"]
    weight_map: dict[str, str] = {}
    total = 0
    for weight_file in files.weights:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(weight_file), framework="pt") as f:
            for name in f.keys():
                for new_name, tensor in qwen2_tensors(name, f.get_tensor(name), hidden):
                    out[new_name] = tensor
        save_file(out, str(dst / weight_file.name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
        weight_map.update({n: weight_file.name for n in out})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(qwen2_config(v1), indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    write_fast_tokenizer(src / VOCAB_FILE, dst, CHATML_JINJA, v1.get("seq_length", 8192))
    return dst


def add_arguments(parser) -> None:
    parser.add_argument("src", help="Qwen v1 checkpoint directory")
    parser.add_argument("dst", help="output directory for the Qwen2ForCausalLM checkpoint")


def run(args) -> int:
    out = convert_to_qwen2(args.src, args.dst)
    print(f"wrote Qwen2ForCausalLM checkpoint to {out}")
    return 0
