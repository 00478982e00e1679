"""LoRA adapter files (checkpoints/lora.py) against PEFT itself, and merge-lora
on fixture checkpoints (no engine)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

from qwen_vllm import cli
from qwen_vllm.checkpoints.fixtures import make_model
from qwen_vllm.checkpoints.lora import (
    DELTA_FRACTION,
    PEFT_PREFIX,
    SAVED_TENSORS,
    TARGETS,
    make_adapter,
    merge_lora,
    read_adapter,
    read_tensors,
    write_tensors,
)
from qwen_vllm.errors import QwenAdapterError, QwenCheckpointError
from qwen_vllm.plugin.checkpoint import validate_checkpoint
from qwen_vllm.plugin.weights import LAYER_MODULES, layer_shapes

SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "mlp_width": 128}
PEFT_071_KEYS = [
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout",
    "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
    "target_modules", "task_type",
]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("base"), "random", dtype=torch.float32, **SMALL)


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(read_tensors(path))
    return out


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def lora_pair(tensors: dict[str, torch.Tensor], weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    module = PEFT_PREFIX + weight.removesuffix(".weight")
    return tensors[f"{module}.lora_B.weight"], tensors[f"{module}.lora_A.weight"]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@dataclass
class TinyConfig:
    """What PEFT reads of a model's config (attributes, and asdict for merging)."""

    model_type: str = "qwen"
    tie_word_embeddings: bool = False


class TinyQwen(nn.Module):
    """Qwen v1's module names and linear shapes (plugin/weights.py) with a
    simple forward through every linear: enough for PEFT to wrap and load."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = TinyConfig()
        h, v = cfg["hidden_size"], cfg["vocab_size"]
        shapes = layer_shapes(cfg)
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(v, h)
        self.transformer.h = nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            block = nn.ModuleDict()
            for m in LAYER_MODULES:
                parent, child = m.qwen.split(".")
                if parent not in block:
                    block[parent] = nn.ModuleDict()
                rows, cols = shapes[f"{m.qwen}.weight"]
                block[parent][child] = nn.Linear(cols, rows, bias=m.bias)
            self.transformer.h.append(block)
        self.lm_head = nn.Linear(h, v, bias=False)

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:  # PEFT's CAUSAL_LM wrapper wants it
        return kwargs

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        def norm(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.rms_norm(x, x.shape[-1:])

        x = self.transformer.wte(input_ids)
        for block in self.transformer.h:
            attn, mlp = block["attn"], block["mlp"]
            x = x + attn["c_proj"](sum(attn["c_attn"](norm(x)).chunk(3, dim=-1)))
            y = norm(x)
            x = x + mlp["c_proj"](mlp["w1"](y) * nn.functional.silu(mlp["w2"](y)))
        return self.lm_head(norm(x))


def tiny_from(model_dir: Path) -> TinyQwen:
    model = TinyQwen(config_of(model_dir))
    result = model.load_state_dict(checkpoint_tensors(model_dir), strict=False)
    assert result.missing_keys == []  # only the layer norms go unused
    return model.eval()


# -- the adapter files ----------------------------------------------------------
def test_adapter_config_is_what_peft_071_writes(base: Path, tmp_path: Path) -> None:
    assert cli.main(["make-adapter", str(base), str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert list(cfg) == PEFT_071_KEYS and not text.endswith("\n")  # sort_keys, indent 2, no newline
    assert text == json.dumps(cfg, indent=2, sort_keys=True)
    assert cfg["r"] == 64 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.05
    assert cfg["target_modules"] == ["c_attn", "c_proj", "w1", "w2"] and cfg["modules_to_save"] is None
    assert cfg["base_model_name_or_path"] == str(base) and cfg["task_type"] == "CAUSAL_LM"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    assert cli.main(["make-adapter", str(base), str(tmp_path / "b"), "--modules-to-save-listed", "--targets", "w1,w2"]) == 0
    cfg, tensors = read_adapter(tmp_path / "b")
    assert cfg["modules_to_save"] == ["wte", "lm_head"] and cfg["target_modules"] == ["w1", "w2"]
    assert all(".lora_" in k and ".mlp.w" in k for k in tensors)  # listed, not saved: finetune.py's files


@pytest.mark.parametrize(
    ("targets", "saved"),
    [(TARGETS, False), (("c_proj",), False), (("w1", "w2"), False), (TARGETS, True)],
    ids=["all", "c_proj-is-two-modules", "mlp", "modules-to-save"],
)
def test_keys_and_shapes_are_peft_s(base: Path, tmp_path: Path, targets: tuple[str, ...], saved: bool) -> None:
    make_adapter(base, tmp_path, rank=8, alpha=16, targets=targets, with_modules_to_save=saved)
    _, ours = read_adapter(tmp_path)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=list(targets), modules_to_save=list(SAVED_TENSORS) if saved else None,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    reference = peft.get_peft_model_state_dict(peft.get_peft_model(TinyQwen(config_of(base)), lora))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


@pytest.mark.parametrize("saved", [False, True], ids=["lora", "lora+modules-to-save"])
def test_peft_loads_it_and_its_output_is_our_merge(base: Path, tmp_path: Path, saved: bool) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8, alpha=32, seed=3, with_modules_to_save=saved)
    merged = merge_lora(base, adapter, tmp_path / "merged")
    _, ours = read_adapter(adapter)

    model = peft.PeftModel.from_pretrained(tiny_from(base), str(adapter))
    again = model.load_adapter(str(adapter), adapter_name="again")
    assert [k for k in again.missing_keys if "again" in k] == [] and again.unexpected_keys == []
    loaded = peft.get_peft_model_state_dict(model)
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)

    ids = torch.randint(0, 151643, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_from(merged)(ids)
        got = model(input_ids=ids)
        plain = tiny_from(base)(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert 0.1 < (got - plain).norm() / plain.norm() < 1  # B is not zero: visible, not overwhelming
    # PEFT's own merge gives the same weights as merge-lora (s = alpha / r = 4 here).
    peft_merged = model.merge_and_unload().state_dict()
    ours_merged = checkpoint_tensors(merged)
    for name, w in peft_merged.items():
        torch.testing.assert_close(w, ours_merged[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strength", [DELTA_FRACTION, 2.0])
def test_delta_is_a_noticeable_fraction_of_each_weight(base: Path, tmp_path: Path, strength: float) -> None:
    _, tensors = read_adapter(make_adapter(base, tmp_path, strength=strength))  # r 64, alpha 16
    weights = checkpoint_tensors(base)
    for name, w in weights.items():
        if name.endswith(".weight") and PEFT_PREFIX + name.replace(".weight", ".lora_A.weight") in tensors:
            b, a = lora_pair(tensors, name)
            ratio = ((b @ a) * 16 / 64).norm() / w.norm()
            assert 0.5 * strength < ratio < 1.5 * strength, (name, float(ratio))


# -- merge-lora -----------------------------------------------------------------
def test_merge_is_w_plus_s_b_a_and_leaves_the_rest_byte_identical(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8, alpha=16, targets=["c_proj"])
    assert cli.main(["merge-lora", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    merged_dir = tmp_path / "merged"
    validate_checkpoint(merged_dir)
    _, tensors = read_adapter(adapter)
    before, after = checkpoint_tensors(base), checkpoint_tensors(merged_dir)
    assert before.keys() == after.keys()
    changed = [n for n in before if n.endswith((".attn.c_proj.weight", ".mlp.c_proj.weight"))]
    assert len(changed) == 4  # "c_proj" is attn.c_proj and mlp.c_proj in both layers
    for name in before:
        if name in changed:
            b, a = lora_pair(tensors, name)
            assert torch.equal(after[name], before[name] + (b @ a) * (16 / 8))
        else:
            assert same_bytes(after[name], before[name]), name
    for path in base.iterdir():
        if path.suffix != ".safetensors":
            assert (merged_dir / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in merged_dir.iterdir()) == sorted(p.name for p in base.iterdir())


def test_rank_and_alpha_patterns_are_honoured(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8, alpha=16, targets=["c_attn", "w1"])
    cfg, tensors = read_adapter(adapter)
    # Rank 4 for c_attn (PEFT matches pattern keys as name suffixes), alpha 2 for w1.
    for key in list(tensors):
        if ".attn.c_attn.lora_A." in key:
            tensors[key] = tensors[key][:4].contiguous()
        elif ".attn.c_attn.lora_B." in key:
            tensors[key] = tensors[key][:, :4].contiguous()
    cfg.update(rank_pattern={"attn.c_attn": 4}, alpha_pattern={"w1": 2})
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    write_tensors(tensors, adapter / "adapter_model.safetensors")
    before, after = checkpoint_tensors(base), checkpoint_tensors(merge_lora(base, adapter, tmp_path / "merged"))
    for name, scale in [("transformer.h.1.attn.c_attn.weight", 16 / 4), ("transformer.h.1.mlp.w1.weight", 2 / 8)]:
        b, a = lora_pair(tensors, name)
        assert torch.equal(after[name], before[name] + (b @ a) * scale)


def test_bin_adapters_are_the_same_adapter(base: Path, tmp_path: Path) -> None:
    st = make_adapter(base, tmp_path / "st", rank=8, seed=5, with_modules_to_save=True)
    pt = make_adapter(base, tmp_path / "bin", rank=8, seed=5, with_modules_to_save=True, bin_format=True)
    assert sorted(p.name for p in pt.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    raw = torch.load(pt / "adapter_model.bin", weights_only=True)  # a plain torch.save'd dict
    ours = read_tensors(st / "adapter_model.safetensors")
    assert raw.keys() == ours.keys() and all(torch.equal(raw[k], ours[k]) for k in ours)
    a, b = checkpoint_tensors(merge_lora(base, st, tmp_path / "m1")), checkpoint_tensors(merge_lora(base, pt, tmp_path / "m2"))
    assert all(same_bytes(a[k], b[k]) for k in a)


def test_modules_to_save_tensors_replace_the_embeddings(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8, with_modules_to_save=True)
    _, tensors = read_adapter(adapter)
    before, after = checkpoint_tensors(base), checkpoint_tensors(merge_lora(base, adapter, tmp_path / "merged"))
    for name in SAVED_TENSORS.values():
        assert torch.equal(after[name], tensors[PEFT_PREFIX + name]) and not torch.equal(after[name], before[name])
    assert same_bytes(after["transformer.ln_f.weight"], before["transformer.ln_f.weight"])


def test_modules_to_save_listed_but_absent_warns_and_keeps_the_embeddings(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8, modules_to_save_listed=True)
    with pytest.warns(UserWarning, match=r"modules_to_save lists \['wte', 'lm_head'\].*never saved them"):
        merged = merge_lora(base, adapter, tmp_path / "merged")
    before, after = checkpoint_tensors(base), checkpoint_tensors(merged)
    assert all(same_bytes(after[n], before[n]) for n in SAVED_TENSORS.values())


def test_bf16_base_gives_bf16_adapter_and_merge(tmp_path: Path) -> None:
    bf16 = make_model(tmp_path / "base", "random", dtype=torch.bfloat16, **SMALL)
    _, tensors = read_adapter(make_adapter(bf16, tmp_path / "adapter", rank=8))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    merged = merge_lora(bf16, tmp_path / "adapter", tmp_path / "merged")
    assert {t.dtype for t in checkpoint_tensors(merged).values()} == {torch.bfloat16}
    # --dtype float32: the merge unrounded (what serving the adapter unmerged computes).
    assert cli.main(["merge-lora", str(bf16), str(tmp_path / "adapter"), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    exact = checkpoint_tensors(tmp_path / "fp32")
    assert {t.dtype for t in exact.values()} == {torch.float32}
    rounded = checkpoint_tensors(merged)
    assert torch.equal(exact["transformer.wte.weight"], rounded["transformer.wte.weight"].float())  # untouched
    assert not torch.equal(exact["transformer.h.0.attn.c_attn.weight"], rounded["transformer.h.0.attn.c_attn.weight"].float())
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert (cfg["fp32"], cfg["bf16"], cfg["fp16"], cfg["torch_dtype"]) == (True, False, False, "float32")


# -- errors ---------------------------------------------------------------------
def test_adapter_for_another_base_names_both_shapes(base: Path, tmp_path: Path) -> None:
    wider = make_model(tmp_path / "wider", "random", dtype=torch.float32, **dict(SMALL, hidden_size=128))
    adapter = make_adapter(wider, tmp_path / "adapter", rank=8)
    with pytest.raises(QwenAdapterError, match=r"has shape \(8, 128\) but the base checkpoint implies \(8, 64\).*another base"):
        merge_lora(base, adapter, tmp_path / "merged")


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight",  # a Qwen2 / Llama name
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight",  # adapter name left in
        "transformer.h.0.attn.c_attn.lora_A.weight",  # PEFT's prefix missing
    ],
)
def test_unknown_module_in_the_adapter(base: Path, tmp_path: Path, key: str) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8)
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    tensors[key] = torch.zeros(8, 64)
    write_tensors(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(QwenAdapterError, match=rf"unknown tensor '{key}'.*N < 2"):
        merge_lora(base, adapter, tmp_path / "merged")


def test_layer_the_base_does_not_have(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8)
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    tensors["base_model.model.transformer.h.5.mlp.w1.lora_A.weight"] = torch.zeros(8, 64)
    write_tensors(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(QwenAdapterError, match=r"h\.5\.mlp\.w1\.lora_A\.weight is for layer 5 but the base checkpoint has 2 layers"):
        merge_lora(base, adapter, tmp_path / "merged")


def test_half_a_lora_pair(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", rank=8, targets=["w2"])
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    del tensors["base_model.model.transformer.h.1.mlp.w2.lora_B.weight"]
    write_tensors(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(QwenAdapterError, match=r"transformer.h.1.mlp.w2 has lora_A but not both"):
        merge_lora(base, adapter, tmp_path / "merged")


def test_unknown_target_and_non_qwen_base(base: Path, tmp_path: Path) -> None:
    with pytest.raises(QwenAdapterError, match=r"unknown LoRA target\(s\) \['q_proj'\]; Qwen v1's linears are"):
        make_adapter(base, tmp_path / "a", targets=["c_attn", "q_proj"])
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QwenCheckpointError, match="expected 'qwen'"):
        make_adapter(other, tmp_path / "b")


def test_gptq_base_gets_a_float16_qlora_adapter_but_no_merge(tmp_path: Path) -> None:
    gptq = make_model(tmp_path / "int4", "random", gptq_bits=4, **SMALL)
    adapter = make_adapter(gptq, tmp_path / "adapter", rank=8)
    _, tensors = read_adapter(adapter)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    key = "base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"
    assert tensors[key].shape == (8, 128)  # from config.json, not the packed qweight
    with pytest.raises(QwenAdapterError, match="Q-LoRA adapters cannot be merged into a GPTQ checkpoint; serve them unmerged"):
        merge_lora(gptq, adapter, tmp_path / "merged")


def test_command_errors_are_one_line_and_exit_2(base: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["make-adapter", str(base), str(tmp_path / "a"), "--targets", "c_attn,q_proj"]) == 2
    assert capsys.readouterr().err == (
        "qwen-vllm make-adapter: error: unknown LoRA target(s) ['q_proj']; Qwen v1's linears are "
        "['c_attn', 'c_proj', 'w1', 'w2']\n"
    )
    assert cli.main(["merge-lora", str(base), str(tmp_path / "none"), str(tmp_path / "m")]) == 2
    assert "adapter_config.json: missing" in capsys.readouterr().err and not (tmp_path / "m").exists()
