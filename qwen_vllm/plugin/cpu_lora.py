"""LoRA on CPU: vLLM's Punica ops, one matmul per adapter, base tokens left alone.

vLLM's CPU backend applies LoRA adapters through ``PunicaWrapperCPU``
(vllm/lora/punica_wrapper/punica_cpu.py), which calls the pure-torch ops of
vllm/lora/ops/torch_ops/lora_ops.py. Those ops gather each token's adapter
matrices (``weights[indices]``) and multiply token by token. Two things go
wrong there:

* a token without an adapter has index -1, which torch reads as the *last*
  adapter slot. The prefill path skips LoRA only when no request in the batch
  has an adapter, and the decode path never does, so once ``max_loras``
  adapters are loaded a request for the base model decodes with the last
  slot's adapter applied;
* every token pays a copy of its adapter's matrices (r x in and out x r per
  module per token), which makes decode with an adapter several times slower
  than the model itself.

``install()`` (run by the plugin's ``register()`` in every vLLM process on a
CPU platform) replaces the six ops ``PunicaWrapperCPU`` uses with versions of
the same signatures that run one matmul per distinct adapter in the batch on
the rows that use it, in the same dtypes as vLLM's (shrink in its float32
buffer, expand in the output's dtype), and leave rows with index < 0 without
a LoRA term (shrink writes zeros there, expand adds nothing).
"""

from __future__ import annotations

import sys

import torch

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
_PUNICA_CPU = "vllm.lora.punica_wrapper.punica_cpu"
_installed = False


def _groups(indices: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """(adapter slot, the rows using it) for each slot in ``indices``; a slice
    when every row uses the same one (the common case: no copy at all)."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [(first, slice(0, indices.numel()))]
    return [(int(i), (indices == i).nonzero().squeeze(1)) for i in torch.unique(indices)]


def _lora_mm(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    indices: torch.Tensor,
    add: bool,
    scale: float = 1.0,
) -> None:
    """``out[t] (+)= scale * inputs[t] @ weights[indices[t]].T`` for rows with
    an adapter (over the first ``min`` columns of the two, as vLLM's ops do);
    rows with index < 0 get nothing added, or zeros when not adding."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    dtype = out.dtype
    for slot, rows in _groups(indices):
        if slot < 0:
            if not add:
                out[rows] = 0
            continue
        y = inputs[rows].to(dtype) @ weights[slot].to(dtype).T
        n = min(y.shape[1], out.shape[1])
        if scale != 1.0:
            y = y * scale
        if add:
            out[rows, :n] += y[:, :n]
        else:
            out[rows, :n] = y[:, :n]


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0) -> None:
    _lora_mm(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add=False, scale=scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True) -> None:
    _lora_mm(inputs, lora_b_weights, output_tensor, lora_indices_tensor[: inputs.shape[0]], add=add_inputs)


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
) -> None:  # fmt: skip
    out = output_tensor[:, slice_offset : slice_offset + slice_size]
    _lora_mm(inputs, lora_b_weights, out, lora_indices_tensor, add=add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches: int,
    max_seq_length: int, token_nums: int, scaling: float,
) -> None:  # fmt: skip
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches: int,
    max_seq_length: int, token_nums: int, add_inputs: bool = False,
) -> None:  # fmt: skip
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches: int,
    max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int, add_inputs: bool = False,
) -> None:  # fmt: skip
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


def install() -> bool:
    """On a CPU platform, make ``PunicaWrapperCPU`` use the ops above (both in
    the package it imports them from and in its own namespace, if it is
    loaded already). Idempotent; returns True when they are installed."""
    global _installed
    if _installed:
        return True
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm.lora.ops.torch_ops as torch_ops

    ours = sys.modules[__name__]
    for module in (torch_ops, sys.modules.get(_PUNICA_CPU)):
        if module is not None:
            for name in _OPS:
                setattr(module, name, getattr(ours, name))
    _installed = True
    return True
