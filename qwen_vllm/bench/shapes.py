"""Qwen (v1) chat sizes by their real config.json shapes, as weightless
checkpoint folders: the bench modes' ``--size`` models (vLLM's dummy weights)."""

from __future__ import annotations

from pathlib import Path

# The public config.json shapes of Qwen (v1) chat models: hidden, layers, heads,
# config "intermediate_size" (twice the real MLP width), vocab, seq_length, rope base.
SIZES: dict[str, dict[str, int]] = {
    "1.8B": dict(hidden=2048, layers=24, heads=16, intermediate=11008, vocab=151936, seq=8192, rope=10000),
    "7B": dict(hidden=4096, layers=32, heads=32, intermediate=22016, vocab=151936, seq=8192, rope=10000),
    "14B": dict(hidden=5120, layers=40, heads=40, intermediate=27392, vocab=152064, seq=2048, rope=10000),
    "72B": dict(hidden=8192, layers=80, heads=64, intermediate=49152, vocab=152064, seq=32768, rope=1000000),
}
GPTQ_GROUP_SIZE = 128  # Qwen's Int4/Int8 checkpoints
INT8_HEAD = " + int8 lm_head"  # appended to a model's name in a report: its lm_head in int8 rows
INT8_VOCAB = " + int8 lm_head and embedding"  # ... and its embedding too


def lm_head_variants(int8_lm_head: bool, int8_embedding: bool = False) -> list[tuple[str, dict]]:
    """(name suffix, vLLM additional_config) for each engine a model gets: as
    it is, and with ``--int8-lm-head`` again with its lm_head in int8 rows
    (``--int8-embedding``: its embedding too)."""
    from qwen_vllm.plugin.lm_head import INT8_EMBEDDING_KEY, INT8_KEY

    if not int8_lm_head:
        return [("", {})]
    if int8_embedding:
        return [("", {}), (INT8_VOCAB, {INT8_KEY: True, INT8_EMBEDDING_KEY: True})]
    return [("", {}), (INT8_HEAD, {INT8_KEY: True})]


def write_shape_model(size: str, out_dir: Path, gptq_bits: int | None = None) -> Path:
    """A weightless Qwen v1 chat directory with ``size``'s real config shapes;
    with ``gptq_bits``, declared GPTQ as Qwen's Int4/Int8 checkpoints are (group 128)."""
    from qwen_vllm.checkpoints.fixtures import (
        gptq_quantize_config,
        qwen_config,
        write_model_files,
    )

    s = SIZES[size]
    cfg = qwen_config(
        s["hidden"], s["layers"], s["heads"], s["intermediate"] // 2,
        seq_length=s["seq"], vocab_size=s["vocab"], rotary_emb_base=s["rope"],
    )  # fmt: skip
    if gptq_bits is not None:
        qcfg = dict(gptq_quantize_config(gptq_bits, GPTQ_GROUP_SIZE), quant_method="gptq")
        cfg = dict(cfg, fp16=True, bf16=False, torch_dtype="float16", quantization_config=qcfg)
    return write_model_files(out_dir, cfg)
