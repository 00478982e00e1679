"""``distributed_executor_backend="ray"`` (the README's way to spread one
model over several GPU nodes, ``-- --distributed-executor-backend ray``) gives
the same greedy tokens as vLLM's default multiprocessing backend.

Same kernels, same sharding, different process machinery: Ray actors instead
of vLLM's forked/spawned workers (vllm/v1/executor/ray_executor.py), which
start Qwen's plugin through Ray's own worker start-up. Tokens must be equal;
prompt logprobs may differ only by run-to-run non-determinism.
Skipped when ray is not installed (it is not in requirements/gpu.txt).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from greedy_reference import vllm_greedy
from test_gptq import prompt_ids  # noqa: F401 (a fixture: the shared prompts as Qwen token ids)

NEW_TOKENS = 24
RAY_LOGPROB_TOL = 1e-4  # fp32, identical kernels and shards: only reduction-order noise


@pytest.fixture(scope="module")
def ray_installed() -> None:
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]'): the ray backend needs it")


@pytest.fixture(scope="module")
def greedy(
    random_model: Path, prompt_ids: list[list[int]], gpu_engine: Callable[..., Any], ray_installed: None
) -> Iterator[Callable[[str, int], tuple[str, list]]]:
    """``greedy(backend, tp)``: the backend vLLM resolved and the greedy
    outputs on the random fixture (fp32, eager); each engine runs once."""
    done: dict[tuple[str, int], tuple[str, list]] = {}

    def get(backend: str, tp: int) -> tuple[str, list]:
        if (backend, tp) not in done:
            with gpu_engine(
                random_model, dtype="float32", enforce_eager=True, max_model_len=1024,
                tensor_parallel_size=tp, distributed_executor_backend=backend,
            ) as llm:  # fmt: skip
                resolved = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
                done[backend, tp] = (resolved, vllm_greedy(llm, prompt_ids, NEW_TOKENS))
        return done[backend, tp]

    yield get
    import ray

    if ray.is_initialized():
        ray.shutdown()


def check_ray_equals_mp(greedy: Callable[[str, int], tuple[str, list]], tp: int) -> None:
    ray_backend, ray_out = greedy("ray", tp)
    mp_backend, mp_out = greedy("mp", tp)
    assert (ray_backend, mp_backend) == ("ray", "mp")  # explicit choices are kept, also at TP=1
    for (ray_lp, ray_tokens), (mp_lp, mp_tokens) in zip(ray_out, mp_out, strict=True):
        assert ray_tokens == mp_tokens
        assert max(abs(a - b) for a, b in zip(ray_lp, mp_lp, strict=True)) <= RAY_LOGPROB_TOL


def test_ray_equals_mp_tp1(greedy: Callable[[str, int], tuple[str, list]]) -> None:
    check_ray_equals_mp(greedy, 1)


@pytest.mark.gpus(2)
def test_ray_equals_mp_tp2(greedy: Callable[[str, int], tuple[str, list]]) -> None:
    """Two ranks: Ray places one actor per GPU, NCCL all-reduce between them."""
    check_ray_equals_mp(greedy, 2)
