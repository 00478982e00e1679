"""Quantized Qwen v1 checkpoints on vLLM: GPTQ names, and what each backend
runs, checked before an engine starts.

Qwen's Int4/Int8 checkpoints are auto-gptq GPTQ (``quant_method "gptq"`` in
config.json's ``quantization_config`` and in quantize_config.json). vLLM 0.32
serves them with its ``auto_gptq`` method; this module supplies the two
things it cannot know and the errors it would raise too late:

* **Module names.** vLLM decides per layer whether it is quantized by matching
  the checkpoint's module names (``transformer.h.0.attn.c_attn``) against its
  own, through the model's weights mapper. Qwen v1's names only map as weight
  prefixes (``...c_attn.``), and ``c_attn`` is vLLM's fused ``qkv_proj``
  whose constituents are ``q/k/v_proj``: :class:`QWenWeightsMapper` gives the
  quantization config those constituent names. Without it every GPTQ layer is
  built unquantized and loading fails on ``qweight``.
* **Hardware.** On CPU, 4-bit and 8-bit symmetric GPTQ run (qwen-vllm's
  kernel, plugin/cpu_gptq.py: group size -1/32/64/128, every per-rank
  dimension a multiple of 32); on a GPU, vLLM's Marlin kernels need compute
  capability 7.5+; FP8 KV cache needs an x86 CPU with AVX-512 or AMX. vLLM
  finds out inside the engine process, deep in kernel set-up;
  :func:`check_engine_settings` (wrapper, worker, stack, before the engine)
  and :func:`check_vllm_config` (vLLM's own config hook, any entry point) say
  so up front, naming what would work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm.model_executor.models.utils import WeightsMapper

from qwen_vllm.errors import QwenQuantizationError
from qwen_vllm.plugin.checkpoint import read_config
from qwen_vllm.plugin.lm_head import check_int8_options
from qwen_vllm.plugin.weights import LAYER_MODULES, lora_renames
from qwen_vllm.runtime.cpu import cpu_caps

# --quantization values that select vLLM's GPTQ support for a gptq checkpoint.
GPTQ_METHODS = ("gptq", "auto_gptq", "gptq_marlin", "marlin")
# CPU: qwen-vllm's kernel (plugin/cpu_gptq.py) or vLLM's CPUWNA16LinearKernel.
CPU_GPTQ_BITS = (4, 8)
CPU_GPTQ_GROUP_SIZES = (-1, 32, 64, 128)
CPU_GPTQ_MULTIPLE = 32
# vLLM's GPTQ kernels on NVIDIA GPUs (Marlin; Machete on Hopper): capability and groups.
GPU_GPTQ_CAPABILITY = (7, 5)
GPU_GPTQ_GROUP_SIZES = (-1, 32, 64, 128)
FP8_KV_CPU_HARDWARE = "an x86 CPU with AVX-512 or AMX"

# -- module names for vLLM's quantization configs ---------------------------------
# Qwen v1 module (inside a layer) -> the vLLM modules it becomes (plugin/weights.py):
# its Qwen2 parts, and the fused module too when it is several parts (c_attn is
# one LoRA target, so packed_modules_mapping names qkv_proj as itself, and
# vLLM's GPTQ check then asks for qkv_proj by that name).
_QWEN_MODULES = {m.qwen: m.parts + ((m.vllm,) if len(m.parts) > 1 else ()) for m in LAYER_MODULES}
_MODULE = re.compile(r"^(?P<layer>transformer\.h\.(?P<index>\d+)\.)?(?P<module>.+)$")


class _ModuleNames(WeightsMapper):
    """The mapper vLLM derives from the model's (``get_rename_mapper``) and
    hands its quantization config and its LoRA loader: maps module names
    (lists of quantized / skipped modules), one Qwen module to every vLLM
    module it becomes; and LoRA tensor names, ``w1``/``w2`` to the up/gate
    LoRA packed into ``gate_up_proj``."""

    def vllm_names(self, name: str) -> list[str]:
        match = _MODULE.match(name)
        targets = _QWEN_MODULES.get(match["module"]) if match else None
        if targets is None:
            # Whole-model modules (transformer.wte, lm_head, ...) map like weight prefixes.
            mapped = self.map_name(name + ".")
            return [] if mapped is None else [mapped.removesuffix(".")]
        layer = f"model.layers.{match['index']}." if match["layer"] else ""
        return [layer + t for t in targets]

    def apply_list(self, values: list[str]) -> list[str]:
        return [out for name in values for out in self.vllm_names(name)]

    def apply_dict(self, values: dict[str, Any]) -> dict[str, Any]:
        return {out: value for name, value in values.items() for out in self.vllm_names(name)}


class QWenWeightsMapper(WeightsMapper):
    """Qwen v1 weight names -> vLLM's (as WeightsMapper), plus module names
    for the quantization config (see the module doc)."""

    def get_rename_mapper(self) -> WeightsMapper:
        renames = super().get_rename_mapper()
        fields = {f.name: getattr(renames, f.name) for f in dataclasses.fields(renames)}
        fields["orig_to_new_substr"] = {**fields["orig_to_new_substr"], **lora_renames()}
        return _ModuleNames(**fields)


# -- reading a checkpoint's quantization ------------------------------------------
def read_quantization_config(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """config.json's ``quantization_config``, else quantize_config.json (marked
    ``quant_method "gptq"``: auto-gptq wrote only that file), else None."""
    qcfg = read_config(model_dir).get("quantization_config")
    if qcfg is not None:
        if not isinstance(qcfg, dict):
            raise QwenQuantizationError(f"{Path(model_dir) / 'config.json'}: quantization_config must be an object")
        return qcfg
    path = Path(model_dir) / "quantize_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QwenQuantizationError(f"{path}: not valid JSON ({exc})") from exc
    return {**data, "quant_method": "gptq"}


def engine_quantization(model_dir: str | os.PathLike, quantization: str | None) -> str | None:
    """The ``quantization`` to give vLLM: the caller's, or "gptq" when the
    checkpoint declares GPTQ only in quantize_config.json (vLLM auto-detects
    config.json's ``quantization_config`` only)."""
    if quantization is not None or "quantization_config" in read_config(model_dir):
        return quantization
    return "gptq" if read_quantization_config(model_dir) is not None else None


# -- what the backends run ----------------------------------------------------------
def check_kv_cache_dtype(kv_cache_dtype: str | None, *, on_cpu: bool) -> None:
    """Raise QwenQuantizationError if vLLM's CPU attention cannot store the
    KV cache as ``kv_cache_dtype``. GPU backends check their own lists."""
    if not on_cpu or kv_cache_dtype in (None, "auto"):
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    accepted = list(CPUAttentionBackend.supported_kv_cache_dtypes)
    if kv_cache_dtype not in accepted:
        raise QwenQuantizationError(
            f"kv_cache_dtype={kv_cache_dtype!r} is not supported by vLLM's CPU attention backend "
            f"(it accepts {accepted}; the fp8 ones need {FP8_KV_CPU_HARDWARE}); "
            "use kv_cache_dtype='auto' (the model dtype)"
        )
    caps = cpu_caps()
    if kv_cache_dtype.startswith("fp8") and not caps.fp8_kv_cache:
        raise QwenQuantizationError(
            f"kv_cache_dtype={kv_cache_dtype!r} (FP8 KV cache) needs {FP8_KV_CPU_HARDWARE} on vLLM's CPU "
            f"backend, or a GPU; this CPU has {caps.isa}. Use kv_cache_dtype='auto' here"
        )


def _gptq_linears(cfg: Mapping[str, Any], tp: int) -> dict[str, tuple[int, int, bool]]:
    """Qwen module -> (input size, output size) on one tensor-parallel rank,
    and whether the input is the one split across ranks (row parallel)."""
    h, mlp = cfg["hidden_size"], cfg["intermediate_size"] // 2
    return {
        "attn.c_attn": (h, 3 * h // tp, False),
        "attn.c_proj": (h // tp, h, True),
        "mlp.w1 + mlp.w2": (h, 2 * mlp // tp, False),
        "mlp.c_proj": (mlp // tp, h, True),
    }


def gpu_capability() -> tuple[int, int] | None:
    """This machine's CUDA compute capability (None without an NVIDIA GPU)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    cap = current_platform.get_device_capability()
    return None if cap is None else (cap.major, cap.minor)


def check_gptq(
    qcfg: Mapping[str, Any],
    cfg: Mapping[str, Any],
    *,
    tensor_parallel_size: int,
    on_cpu: bool,
    where: str,
    capability: tuple[int, int] | None = None,
) -> None:
    """Raise QwenQuantizationError if this GPTQ checkpoint cannot run here
    with this tensor-parallel size (``where`` names the checkpoint;
    ``capability`` the NVIDIA GPU's, when there is one)."""
    bits, group_size = qcfg.get("bits"), qcfg.get("group_size", -1)
    tp = tensor_parallel_size
    if capability is not None and capability < GPU_GPTQ_CAPABILITY:
        need = ".".join(map(str, GPU_GPTQ_CAPABILITY))
        raise QwenQuantizationError(
            f"{where}: GPTQ checkpoints need an NVIDIA GPU with compute capability {need} or newer "
            f"(vLLM's Marlin kernels); this GPU has {capability[0]}.{capability[1]}. Use the unquantized checkpoint"
        )
    if not on_cpu and group_size not in GPU_GPTQ_GROUP_SIZES:
        raise QwenQuantizationError(
            f"{where}: GPTQ group_size={group_size}; vLLM's GPU kernels (Marlin) support {list(GPU_GPTQ_GROUP_SIZES)}"
        )
    if on_cpu and isinstance(bits, int) and bits not in CPU_GPTQ_BITS:
        raise QwenQuantizationError(
            f"{where}: GPTQ Int{bits} checkpoints do not run on CPU (4-bit and 8-bit do); use the Int4, "
            "Int8 or unquantized checkpoint"
        )
    if on_cpu and group_size not in CPU_GPTQ_GROUP_SIZES:
        raise QwenQuantizationError(
            f"{where}: GPTQ group_size={group_size}; the CPU GPTQ kernels support {list(CPU_GPTQ_GROUP_SIZES)}"
        )
    for module, (size_in, size_out, split_in) in _gptq_linears(cfg, tp).items():
        if group_size not in (-1, None) and size_in % group_size:
            cause = f"tensor_parallel_size={tp} gives each rank {size_in} inputs" if split_in else f"{size_in} inputs"
            raise QwenQuantizationError(
                f"{where}: {module}: {cause}, not a multiple of the GPTQ group_size {group_size}, so the "
                "quantization groups would straddle ranks; choose a tensor_parallel_size that keeps "
                "each rank's share a whole number of groups"
            )
        if on_cpu and (size_in % CPU_GPTQ_MULTIPLE or size_out % CPU_GPTQ_MULTIPLE):
            raise QwenQuantizationError(
                f"{where}: {module}: {size_in} x {size_out} per rank (tensor_parallel_size={tp}); the CPU "
                f"GPTQ kernels need both a multiple of {CPU_GPTQ_MULTIPLE}"
            )


def _is_gptq(qcfg: Mapping[str, Any] | None, quantization: str | None) -> bool:
    if qcfg is None or str(qcfg.get("quant_method", "")).lower() != "gptq":
        return False
    return quantization is None or quantization in GPTQ_METHODS


def check_engine_settings(
    model_dir: str | os.PathLike,
    *,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    tensor_parallel_size: int = 1,
) -> None:
    """Before building an engine on ``model_dir``: raise QwenQuantizationError
    for a GPTQ checkpoint or KV-cache dtype this machine cannot run, naming
    the hardware that can. For the wrapper, the worker and the stack."""
    from qwen_vllm.runtime.cpu import on_cpu

    cpu = on_cpu()
    check_kv_cache_dtype(kv_cache_dtype, on_cpu=cpu)
    qcfg = read_quantization_config(model_dir)
    if _is_gptq(qcfg, quantization):
        check_gptq(
            qcfg,
            read_config(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            on_cpu=cpu,
            where=str(model_dir),
            capability=None if cpu else gpu_capability(),
        )


def check_vllm_config(vllm_config: Any) -> None:
    """The same checks on vLLM's own config, from its per-architecture config
    hook: covers entry points that bypass qwen-vllm (``vllm serve``-style)."""
    from vllm.platforms import current_platform

    model_config = vllm_config.model_config
    cpu = current_platform.is_cpu()
    check_kv_cache_dtype(vllm_config.cache_config.cache_dtype, on_cpu=cpu)
    check_int8_options(vllm_config.additional_config, on_cpu=cpu)
    model_dir = str(model_config.model)
    if model_config.quantization is None and Path(model_dir).is_dir() and engine_quantization(model_dir, None):
        # vLLM would build float layers and then fail on the first "qweight".
        raise QwenQuantizationError(
            f"{model_dir} declares GPTQ only in quantize_config.json, which vLLM reads only when told: "
            "pass --quantization gptq (quantization='gptq'); qwen-vllm worker and vLLMWrapper do this themselves"
        )
    qcfg = getattr(model_config.hf_config, "quantization_config", None)
    if isinstance(qcfg, Mapping) and model_config.quantization in (*GPTQ_METHODS, None):
        check_gptq(
            qcfg,
            model_config.hf_config.to_dict(),
            tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
            on_cpu=cpu,
            where=str(model_config.model),
            capability=None if cpu else gpu_capability(),
        )


def gptq_tp_table(shapes: Mapping[str, Mapping[str, int]], group_size: int = 128, tps: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """Markdown table: which model shapes (``hidden``/``intermediate`` as in
    config.json) run GPTQ Int4/Int8 at each tensor-parallel size, on a GPU and
    on vLLM's CPU backend -- decided by :func:`check_gptq` itself."""

    def cell(shape: Mapping[str, int], bits: int, tp: int, on_cpu: bool) -> str:
        cfg = {"hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"]}
        try:
            check_gptq({"bits": bits, "group_size": group_size}, cfg, tensor_parallel_size=tp, on_cpu=on_cpu, where="")
        except QwenQuantizationError:
            return "no"
        return "yes"

    head = [f"Int{bits} TP={tp}" for bits in (4, 8) for tp in tps]
    rows = ["| Qwen size | where | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for on_cpu, where in ((False, "GPU"), (True, "CPU")):
        for name, shape in shapes.items():
            cells = [cell(shape, bits, tp, on_cpu) for bits in (4, 8) for tp in tps]
            rows.append(f"| {name} | {where} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
