"""Qwen v1's dynamic NTK-aware RoPE + LogN attention on vLLM, per request,
under continuous batching, without patching vLLM.

The maths is in ``qwen_vllm.plugin.ntk``. The vLLM side has three parts:

* ``QWenEngineConfig`` (``qwen_vllm.plugin.engine_config``), vLLM's
  per-architecture config hook: keeps ``max_model_len``
  at ``seq_length`` unless the user opts in (up to 32768), and when dynamic
  NTK is needed turns on vLLM's M-RoPE position path (an ``mrope_section`` on
  the config) and turns off prefix caching (its block hashes cannot tell one
  alpha bucket's K/V from another's).
* ``QWenLMHeadModel.get_mrope_input_positions`` (model.py) calls
  ``encoded_positions``: vLLM's runner calls it once per request with the
  whole prompt, slices it per prefill chunk and continues decode positions
  from its delta, so every token of a request carries
  ``bucket(prompt_len) * stride + p`` -- alpha fixed at prefill, kept through
  decode, whatever else shares the batch.
* Model Runner V2 (vLLM's GPU runner where Triton is present) re-adds a
  preempted request with its prompt *and* output tokens as its prefill, and
  asks for positions again: :func:`keep_prompt_alpha_on_resume` wraps its
  ``DefaultModelState.add_request`` to tell the model the prompt length, so
  the resumed request keeps the alpha its prompt chose (Qwen fixes alpha at
  prefill). vLLM's first runner (CPU, and GPU without MRV2) keeps a
  preempted request's positions itself.
* ``QwenNTKRotaryEmbedding`` replaces each layer's rotary embedding: vLLM's
  own kernel over one Qwen cos/sin cache per alpha, concatenated, then the
  LogN factor on the query, looked up by the same encoded position.

With ``max_model_len <= seq_length`` (the default) none of this is installed:
the model is vLLM's plain Qwen2 path.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.ntk import LongContextPlan

logger = init_logger(f"vllm.{__name__}")  # vLLM's log handler and format


class QwenNTKRotaryEmbedding(RotaryEmbedding):
    """Rotary embedding over encoded positions, with Qwen's LogN query scale.

    ``cos_sin_cache`` rows ``[b * stride, (b + 1) * stride)`` are Qwen's cache
    for ``plan.alphas[b]`` (built like vLLM's: fp32, then the model dtype), so
    bucket 0 (alpha 1) is bit-for-bit the stock cache. One instance is shared
    by all layers.
    """

    def __init__(self, plan: LongContextPlan, head_size: int, base: float, dtype: torch.dtype) -> None:
        self.plan = plan
        super().__init__(
            head_size=head_size,
            rotary_dim=head_size,
            max_position_embeddings=plan.stride * len(plan.alphas),
            base=base,
            is_neox_style=True,
            dtype=dtype,
        )
        table = plan.logn_table()
        self.logn_scale: torch.Tensor | None
        if table is None:
            self.logn_scale = None
        else:
            self.register_buffer("logn_scale", table.to(dtype), persistent=False)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        t = torch.arange(self.plan.stride, dtype=torch.float)
        caches = []
        for base in self.plan.rope_bases(self.base, self.rotary_dim):
            freqs = torch.einsum("i,j -> ij", t, self._compute_inv_freq(base))
            caches.append(torch.cat((freqs.cos(), freqs.sin()), dim=-1))
        return torch.cat(caches)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if positions.dim() == 2:  # vLLM's M-RoPE layout: identical rows
            positions = positions[0]
        query, key = super().forward(positions, query, key)
        if self.logn_scale is not None:
            # Qwen scales the rotated query (in the model dtype) before attention.
            query = query * self.logn_scale.index_select(0, positions).unsqueeze(-1)
        return query, key

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.plan.stride}, alphas={self.plan.alphas}, logn={self.plan.logn}"


def install_long_context(model: nn.Module, vllm_config) -> LongContextPlan | None:
    """Give every decoder layer of a Qwen2Model the long-context rotary
    embedding when the engine's max_model_len needs it; returns the plan
    (None: nothing installed, plain RoPE)."""
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    plan = LongContextPlan.of(hf_config, model_config.max_model_len)
    encoded = plan is not None and plan.encodes_positions
    if encoded != model_config.uses_mrope:
        raise QwenCheckpointError(
            "Qwen long context: the engine config and the model disagree on per-request "
            f"positions (max_model_len={model_config.max_model_len}, seq_length="
            f"{getattr(hf_config, 'seq_length', None)}); qwen_vllm.register() must run before "
            "the engine config is built (it is the vllm.general_plugins entry point)"
        )
    if plan is None:
        return None
    rotary = QwenNTKRotaryEmbedding(
        plan,
        head_size=hf_config.head_dim,
        base=hf_config.rope_parameters["rope_theta"],
        dtype=model_config.dtype,
    )
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)  # PPMissingLayer on other PP ranks
        if attn is not None:
            attn.rotary_emb = rotary
    if plan.encodes_positions:
        keep_prompt_alpha_on_resume()
    logger.info(
        "Qwen long context: max_model_len=%d > seq_length=%d; NTK alphas %s, LogN %s",
        plan.stride,
        plan.seq_length,
        plan.alphas,
        "on" if plan.logn else "off",
    )
    return plan


def encoded_positions(
    plan: LongContextPlan | None, input_tokens: list[int], mm_features: list, prompt_len: int | None = None
) -> tuple[torch.Tensor, int]:
    """vLLM's ``get_mrope_input_positions`` for a Qwen request: the encoded
    positions of its prefill tokens (the prompt, or prompt + output on an MRV2
    resume, with the prompt's alpha) and the delta for its decode positions."""
    if plan is None or not plan.encodes_positions:
        raise QwenCheckpointError("Qwen long context: per-request positions asked for, but none are configured")
    if mm_features:
        raise QwenCheckpointError("Qwen v1 is a text-only model: multi-modal inputs are not supported")
    return plan.encoded_positions(len(input_tokens), prompt_len)


def keep_prompt_alpha_on_resume() -> bool:
    """Wrap Model Runner V2's ``DefaultModelState.add_request`` (once per
    process) so a model with a ``prompt_len_for_positions`` attribute learns
    each request's prompt length while vLLM asks it for positions. False
    where this vLLM has no Model Runner V2."""
    try:
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    except ImportError:
        return False
    original = DefaultModelState.add_request
    if getattr(original, "keeps_prompt_alpha", False):
        return True

    def add_request(self, req_index: int, new_req_data) -> None:
        model = self.model
        if not hasattr(model, "prompt_len_for_positions"):
            return original(self, req_index, new_req_data)
        model.prompt_len_for_positions = new_req_data.prompt_len
        try:
            return original(self, req_index, new_req_data)
        finally:
            model.prompt_len_for_positions = None

    add_request.keeps_prompt_alpha = True
    DefaultModelState.add_request = add_request
    return True
