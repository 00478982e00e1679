"""QWenConfig: Qwen v1's config.json (``model_type "qwen"``) read as a Qwen2 config.

Qwen v1 is architecturally Qwen2 with full-head KV; this class maps the v1
field names onto Qwen2Config so vLLM's Qwen2 layers can serve it, and keeps
the v1 fields so the config still round-trips to a valid Qwen v1 config.json.
It is registered for ``model_type "qwen"`` in transformers and vLLM, so the
checkpoint's own ``configuration_qwen.py`` never runs.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config

from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.ntk import LongContextFlags
from qwen_vllm.runtime.cpu import default_float_dtype

# v1 keys that Qwen2Config has no field for, kept as attributes. kv_channels,
# layer_norm_epsilon, rotary_emb_base and rotary_pct are mapped onto Qwen2
# fields instead (and written back by to_dict()).
_V1_MAPPED_KEYS = ("kv_channels", "layer_norm_epsilon", "rotary_emb_base", "rotary_pct")
_V1_ONLY_KEYS = (
    "seq_length",
    "no_bias",
    "use_dynamic_ntk",
    "use_logn_attn",
    "use_flash_attn",
    "bf16",
    "fp16",
    "fp32",
    "scale_attn_weights",
    "softmax_in_fp32",
    "use_cache_quantization",
    "use_cache_kernel",
    "emb_dropout_prob",
    "attn_dropout_prob",
)
_FLAG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# GQA-era keys a Qwen v1 checkpoint cannot carry: every head has its own K/V.
_GQA_KEYS = ("num_key_value_heads", "multi_query_group_num", "num_kv_heads")


class QWenConfig(Qwen2Config):
    """Qwen v1 config, exposed to vLLM as the Qwen2 fields it needs."""

    model_type = "qwen"

    def __post_init__(self, **kwargs: Any) -> None:
        v1 = {k: kwargs.pop(k) for k in _V1_MAPPED_KEYS + _V1_ONLY_KEYS if k in kwargs}
        for key in _GQA_KEYS[1:]:
            if key in kwargs:
                raise QwenCheckpointError(
                    f"config.json: field {key!r} is a grouped-query-attention field; "
                    "Qwen v1 (model_type 'qwen') has one K/V head per attention head"
                )
        if self.num_key_value_heads not in (None, self.num_attention_heads, 32):
            # 32 is Qwen2Config's default; any other value came from config.json.
            raise QwenCheckpointError(
                "config.json: num_key_value_heads="
                f"{self.num_key_value_heads} but Qwen v1 has no grouped-query "
                f"attention (num_attention_heads={self.num_attention_heads})"
            )
        self.num_key_value_heads = self.num_attention_heads
        rotary_pct = v1.get("rotary_pct", 1.0)
        if rotary_pct != 1.0:
            raise QwenCheckpointError(
                f"config.json: rotary_pct={rotary_pct} is not supported "
                "(every released Qwen v1 model uses 1.0)"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        kv_channels = v1.get("kv_channels", head_dim)
        if kv_channels != head_dim or head_dim * self.num_attention_heads != self.hidden_size:
            raise QwenCheckpointError(
                f"config.json: kv_channels={kv_channels} must equal hidden_size / "
                f"num_attention_heads = {self.hidden_size}/{self.num_attention_heads}"
            )
        if self.intermediate_size % 2:
            raise QwenCheckpointError(
                f"config.json: intermediate_size={self.intermediate_size} must be even "
                "(Qwen v1 stores twice the MLP width)"
            )
        # Qwen v1 stores twice the real MLP width (QWenMLP uses intermediate_size // 2).
        self.intermediate_size //= 2
        if "layer_norm_epsilon" in v1:
            self.rms_norm_eps = v1["layer_norm_epsilon"]
        if self.rope_parameters is None:
            self.rope_parameters = {
                "rope_type": "default",
                "rope_theta": float(v1.get("rotary_emb_base", 10000)),
            }
        self.head_dim = head_dim
        if self.dtype is None and kwargs.get("torch_dtype") is None:
            # Official configs carry no torch_dtype and all precision flags false;
            # Qwen's own code then picks bf16 on GPUs that have it and float32 on
            # a CPU. A set flag wins.
            flags = [f for f in ("bf16", "fp16", "fp32") if v1.get(f) is True]
            self.dtype = _FLAG_DTYPES[flags[0]] if flags else default_float_dtype()
        v1.setdefault("seq_length", self.max_position_embeddings)
        for key in _V1_ONLY_KEYS:
            if key in v1:
                setattr(self, key, v1[key])
        # The longest max_model_len vLLM may accept (32768 with dynamic NTK /
        # LogN). vLLM's config hook (qwen_vllm.plugin.engine_config) keeps the default
        # at seq_length; users opt in with max_model_len.
        self.model_max_length = LongContextFlags.of(v1).max_context
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Serialise in Qwen v1 terms, so from_dict(to_dict()) is the identity."""
        out = super().to_dict()
        out["intermediate_size"] = self.intermediate_size * 2
        out["kv_channels"] = self.head_dim
        out["layer_norm_epsilon"] = self.rms_norm_eps
        out["rotary_emb_base"] = self.rope_parameters["rope_theta"]
        out["rotary_pct"] = 1.0
        for key in (
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_parameters",
            "head_dim",
            "model_max_length",  # derived from seq_length and the long-context flags
            "mrope_section",  # set per engine by vLLM's config hook
        ):
            out.pop(key, None)
        return out
