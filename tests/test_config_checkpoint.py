"""QWenConfig mapping and the clear errors a broken checkpoint gets (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_vllm.checkpoints.fixtures import qwen_config, random_weights, write_checkpoint
from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.checkpoint import read_generation_config, validate_checkpoint
from qwen_vllm.plugin.config import QWenConfig
from qwen_vllm.runtime.cpu import default_float_dtype

QWEN_7B_CHAT = qwen_config(4096, 32, 32, 11008)


def test_qwen_7b_config_maps_to_qwen2_fields() -> None:
    cfg = QWenConfig.from_dict(dict(QWEN_7B_CHAT))
    assert cfg.intermediate_size == 11008  # config.json says 22016: twice the MLP width
    assert cfg.num_key_value_heads == 32 and cfg.head_dim == 128
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg.seq_length == 8192 and cfg.use_dynamic_ntk and cfg.use_logn_attn
    assert cfg.dtype == getattr(torch, default_float_dtype())  # no torch_dtype, all flags false


def test_config_round_trips_without_halving_twice() -> None:
    cfg = QWenConfig.from_dict(dict(QWEN_7B_CHAT))
    again = QWenConfig.from_dict(cfg.to_dict())
    assert again.intermediate_size == 11008
    assert cfg.to_dict()["intermediate_size"] == 22016
    assert again.to_dict()["rotary_emb_base"] == 10000.0


@pytest.mark.parametrize("native_bf16", [True, False])
def test_dtype_without_flags_is_bf16_on_gpus_and_on_cpus_that_compute_it(monkeypatch, native_bf16: bool) -> None:
    """Qwen's code picks bf16 on GPUs and float32 on a CPU; a CPU with AMX or
    AVX512_BF16 gets bf16 (faster there, and Qwen's trained dtype)."""
    from qwen_vllm.runtime import cpu

    caps = cpu.CpuCaps(x86=True, avx512=native_bf16, amx=native_bf16, bf16=native_bf16)
    monkeypatch.setattr(cpu, "cpu_caps", lambda: caps)
    monkeypatch.setattr(cpu, "on_cpu", lambda: True)
    assert QWenConfig.from_dict(dict(QWEN_7B_CHAT)).dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert QWenConfig.from_dict({**QWEN_7B_CHAT, "bf16": True}).dtype == torch.bfloat16  # a set flag wins
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)
    assert QWenConfig.from_dict(dict(QWEN_7B_CHAT)).dtype == torch.bfloat16


def test_cpu_caps_bf16_is_what_torch_reports() -> None:
    from qwen_vllm.runtime.cpu import cpu_caps

    caps = cpu_caps()
    assert caps.bf16 == (caps.amx or torch.cpu._is_avx512_bf16_supported())
    assert caps.float_dtype == ("bfloat16" if caps.bf16 else "float32")


@pytest.mark.parametrize(
    ("extra", "dtype"),
    [({"fp16": True}, torch.float16), ({"fp32": True}, torch.float32), ({"torch_dtype": "float32"}, torch.float32)],
)
def test_dtype_auto_follows_flags(extra, dtype) -> None:
    assert QWenConfig.from_dict({**QWEN_7B_CHAT, **extra}).dtype == dtype


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_key_value_heads": 8}, "num_key_value_heads=8"),
        ({"multi_query_group_num": 2}, "multi_query_group_num"),
        ({"rotary_pct": 0.5}, "rotary_pct=0.5"),
        ({"kv_channels": 64}, "kv_channels=64"),
        ({"intermediate_size": 22017}, "intermediate_size=22017"),
    ],
)
def test_config_rejects_what_qwen_v1_cannot_have(extra, message) -> None:
    with pytest.raises(QwenCheckpointError, match=message):
        QWenConfig.from_dict({**QWEN_7B_CHAT, **extra})


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> Path:
    cfg = qwen_config(64, 1, 1, 64)
    return write_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg))


def test_valid_checkpoint_passes(tiny_checkpoint: Path) -> None:
    files = validate_checkpoint(tiny_checkpoint)
    assert len(files.weights) == 2 and files.vocab.name == "qwen.tiktoken"


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", r"config\.json: missing"),
        ("qwen.tiktoken", r"qwen\.tiktoken: missing"),
        ("model-00002-of-00002.safetensors", r"lists weight files that are missing: \['model-00002"),
    ],
)
def test_missing_file_is_named(tiny_checkpoint: Path, remove: str, message: str) -> None:
    (tiny_checkpoint / remove).unlink()
    with pytest.raises(QwenCheckpointError, match=message):
        validate_checkpoint(tiny_checkpoint)


def test_no_weights_at_all(tiny_checkpoint: Path) -> None:
    for path in tiny_checkpoint.glob("model*"):
        path.unlink()
    with pytest.raises(QwenCheckpointError, match="no weights"):
        validate_checkpoint(tiny_checkpoint)


def test_weight_shape_disagreeing_with_config(tmp_path: Path) -> None:
    cfg = qwen_config(64, 1, 1, 64)
    weights = random_weights(cfg)
    weights["transformer.h.0.mlp.w1.weight"] = torch.zeros(32, 64)
    ckpt = write_checkpoint(tmp_path / "bad", cfg, weights)
    with pytest.raises(QwenCheckpointError, match=r"'transformer\.h\.0\.mlp\.w1\.weight' has shape \(32, 64\).*\(64, 64\)"):
        validate_checkpoint(ckpt)


def test_gqa_field_in_config_json(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_key_value_heads": 2}))
    with pytest.raises(QwenCheckpointError, match=r"config\.json: num_key_value_heads=2"):
        validate_checkpoint(tiny_checkpoint)


def test_not_a_qwen_v1_checkpoint(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "qwen2"}))
    with pytest.raises(QwenCheckpointError, match="model_type is 'qwen2'"):
        validate_checkpoint(tiny_checkpoint)


def test_unknown_chat_format(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_format": "alpaca"}))
    with pytest.raises(QwenCheckpointError, match="unknown chat_format 'alpaca'"):
        read_generation_config(tiny_checkpoint)


def test_private_hooks_still_exist() -> None:
    """The plugin relies on private vLLM/transformers hooks: fail loudly if they move."""
    from transformers.models.auto import tokenization_auto
    from vllm import ModelRegistry
    from vllm.model_executor.models import registry
    from vllm.transformers_utils import config as vllm_config

    import qwen_vllm
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

    qwen_vllm.register()
    qwen_vllm.register()  # idempotent
    assert vllm_config._CONFIG_REGISTRY["qwen"] is QWenConfig
    assert tokenization_auto.REGISTERED_TOKENIZER_CLASSES["QWenTokenizer"] is QWenTokenizer
    assert "QWenLMHeadModel" in ModelRegistry.get_supported_archs()
    # vLLM's own record of dropping Qwen v1: if it disappears, re-check the registry path.
    assert registry._PREVIOUSLY_SUPPORTED_MODELS.get("QWenLMHeadModel") == "0.23.0"


def test_fixture_remote_code_files_are_traps(tiny_checkpoint: Path) -> None:
    import runpy

    with pytest.raises(RuntimeError, match="must never be imported"):
        runpy.run_path(str(tiny_checkpoint / "tokenization_qwen.py"))
