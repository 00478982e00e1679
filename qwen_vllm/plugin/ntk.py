"""Qwen v1's long-context maths (dynamic NTK-aware RoPE + LogN) and the
per-engine plan that maps it onto vLLM positions. Pure Python/torch: no vLLM.

Qwen's ``modeling_qwen.py`` (the spec):

* alpha, once per request at prefill, from the prompt length L::

      context_value = math.log(L / seq_length, 2) + 1
      ntk_alpha = max(2 ** math.ceil(context_value) - 1, 1)

  i.e. alpha = 2^k - 1 for the least k >= 1 with seq_length * 2^(k-1) >= L
  (1, 3, 7, 15, ...). Decode keeps the prefill alpha, even past the next
  boundary.
* rotary base ``base * alpha ** (d / (d - 2))``, cos/sin built in fp32;
* LogN: the query at absolute position p is multiplied by
  ``math.log(p + 1, seq_length)`` when p + 1 > seq_length (else 1), from a
  list built in Python floats, stored in fp32 and cast to the model dtype.

vLLM's model sees only positions, so each request gets *encoded* positions
``p_enc = bucket * stride + p`` (stride = max_model_len) and the rotary cache
is one Qwen cache per alpha bucket, concatenated; LogN is a table indexed by
``p_enc`` too (see ``qwen_vllm.plugin.long_context``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qwen_vllm.errors import QwenCheckpointError, QwenContextError

# Qwen's logn list covers positions below 32768 (``range(1, 32768)``): the
# longest context its code serves. Position 32767 uses the same formula.
QWEN_MAX_CONTEXT = 32768


def ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen's ``get_ntk_alpha(length)`` in exact integer arithmetic."""
    if length < 1 or seq_length < 1:
        raise ValueError(f"lengths must be positive (length={length}, seq_length={seq_length})")
    k = 1
    while seq_length << (k - 1) < length:
        k += 1
    return 2**k - 1


def alpha_bucket(length: int, seq_length: int) -> int:
    """Index of ``ntk_alpha(length)`` in (1, 3, 7, 15, ...)."""
    return ntk_alpha(length, seq_length).bit_length() - 1


def logn_scales(num_positions: int, seq_length: int) -> torch.Tensor:
    """fp32 LogN factor for positions 0..num_positions-1, built like Qwen's list."""
    values = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, num_positions + 1)]
    return torch.tensor(values, dtype=torch.float32)


def _get(config: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class LongContextFlags:
    """What a Qwen v1 config asks for (Qwen's defaults: both tricks on)."""

    seq_length: int
    dynamic_ntk: bool
    logn: bool

    @classmethod
    def of(cls, config: Mapping[str, Any] | Any) -> LongContextFlags:
        seq_length = _get(config, "seq_length", None) or _get(config, "max_position_embeddings", None)
        if not isinstance(seq_length, int) or seq_length < 1:
            raise QwenCheckpointError(f"config.json: seq_length={seq_length!r} must be a positive integer")
        return cls(
            seq_length=seq_length,
            dynamic_ntk=bool(_get(config, "use_dynamic_ntk", True)),
            logn=bool(_get(config, "use_logn_attn", True)),
        )

    @property
    def max_context(self) -> int:
        """Longest max_model_len the config supports: seq_length, or Qwen's
        32768 when dynamic NTK or LogN is on."""
        if self.dynamic_ntk or self.logn:
            return max(QWEN_MAX_CONTEXT, self.seq_length)
        return self.seq_length

    def check_max_model_len(self, max_model_len: int | None) -> None:
        """Raise QwenContextError if ``max_model_len`` exceeds what the config supports."""
        if max_model_len is None or max_model_len == -1:
            return
        if max_model_len > self.max_context:
            how = (
                "Qwen's dynamic NTK / LogN attention reach"
                if self.dynamic_ntk or self.logn
                else "use_dynamic_ntk and use_logn_attn are off, so the model supports"
            )
            raise QwenContextError(
                f"max_model_len={max_model_len} is longer than this Qwen checkpoint supports: "
                f"{how} {self.max_context} tokens (seq_length={self.seq_length})"
            )


@dataclass(frozen=True)
class LongContextPlan:
    """How one engine serves contexts beyond seq_length.

    ``alphas[b]`` is the NTK alpha of bucket b; a request's positions are
    offset by ``bucket * stride``. Without dynamic NTK there is one bucket
    (alpha 1) and positions stay plain.
    """

    seq_length: int
    stride: int
    alphas: tuple[int, ...]
    logn: bool

    @classmethod
    def of(cls, config: Mapping[str, Any] | Any, max_model_len: int) -> LongContextPlan | None:
        """The plan for an engine of ``max_model_len``, or None when nothing
        differs from plain RoPE (every context fits in seq_length, or both
        tricks are off)."""
        flags = LongContextFlags.of(config)
        if max_model_len <= flags.seq_length or not (flags.dynamic_ntk or flags.logn):
            return None
        flags.check_max_model_len(max_model_len)
        buckets = alpha_bucket(max_model_len, flags.seq_length) + 1 if flags.dynamic_ntk else 1
        return cls(
            seq_length=flags.seq_length,
            stride=max_model_len,
            alphas=tuple(2 ** (b + 1) - 1 for b in range(buckets)),
            logn=flags.logn,
        )

    @property
    def encodes_positions(self) -> bool:
        """True when requests need per-request (encoded) positions."""
        return len(self.alphas) > 1

    def bucket(self, prompt_len: int) -> int:
        if prompt_len > self.stride:
            raise QwenContextError(f"prompt of {prompt_len} tokens exceeds max_model_len={self.stride}")
        return alpha_bucket(prompt_len, self.seq_length) if self.encodes_positions else 0

    def encoded_positions(self, num_tokens: int, prompt_len: int | None = None) -> tuple[torch.Tensor, int]:
        """``(positions [3, num_tokens], delta)``: the encoded positions of a
        request's first ``num_tokens`` tokens (three identical rows, vLLM's
        M-RoPE layout) and the offset vLLM adds to every later (decode)
        position. The alpha bucket is the prompt's (``prompt_len``, default
        ``num_tokens``): a request resumed with its output tokens keeps it."""
        offset = self.bucket(num_tokens if prompt_len is None else prompt_len) * self.stride
        positions = torch.arange(offset, offset + num_tokens, dtype=torch.int64)
        return positions.expand(3, -1), offset

    def rope_bases(self, base: float, rotary_dim: int) -> list[float]:
        """Qwen's NTK base for each bucket: ``base * alpha ** (d / (d - 2))``."""
        return [base * alpha ** (rotary_dim / (rotary_dim - 2)) for alpha in self.alphas]

    def logn_table(self) -> torch.Tensor | None:
        """fp32 LogN factor indexed by encoded position (None when LogN is off)."""
        if not self.logn:
            return None
        return logn_scales(self.stride, self.seq_length).repeat(len(self.alphas))
