"""GPU tests: what only a CUDA device exercises (CUDA graphs, torch.compile,
Model Runner V2, Marlin/Machete, fork-started engine processes, Ray).

Every test under tests/gpu gets the ``gpu`` marker and is skipped when torch
sees no CUDA device; ``@pytest.mark.gpus(n)`` also skips when fewer than n
devices are visible. The CPU suite's fixtures (tests/conftest.py: fixture
checkpoints, session temp dir, offline settings) apply here unchanged.

Nothing here creates a CUDA context in the pytest process: device counts,
capabilities and memory come from NVML (torch's NVML-based check, vLLM's
NVML-based platform, vLLM's vendored pynvml). So the GPU memory the tests
measure is the engines' alone, and every engine starts with the method its
test chose (vLLM would force spawn once the parent has initialised CUDA:
vllm/utils/system_utils.py _maybe_force_spawn).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
# Used GPU memory may differ from its level before an engine by this much once
# the engine is gone (other tenants, the driver's own bookkeeping).
MEMORY_SLACK = 512 * 2**20


def cuda_device_count() -> int:
    """CUDA devices torch can see (0 without a CUDA build or device).

    With PYTORCH_NVML_BASED_CUDA_CHECK=1 (set for this call only: the
    processes tests start must see the user's environment)
    torch.cuda.is_available() asks NVML instead of cuInit
    (torch/cuda/__init__.py: _nvml_based_avail); device_count() uses NVML."""
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marker added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if HERE in item.path.parents]
    if not gpu_items:
        return
    count = cuda_device_count()
    for item in gpu_items:
        item.add_marker(pytest.mark.gpu)
        if count == 0:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
            continue
        needed = max((int(mark.args[0]) for mark in item.iter_markers("gpus")), default=1)
        if count < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA devices, {count} visible"))


# -- GPU memory, from NVML (no CUDA context in this process) -------------------------
def gpu_memory_used() -> int:
    """Bytes in use on every GPU of the machine (NVML's view, all processes).

    Summed over all devices on purpose: CUDA_VISIBLE_DEVICES numbering need not
    match NVML's, and the tests look at differences only."""
    from vllm.third_party import pynvml

    pynvml.nvmlInit()
    try:
        return sum(
            int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
            for i in range(pynvml.nvmlDeviceGetCount())
        )
    finally:
        pynvml.nvmlShutdown()


def wait_memory_back(baseline: int, within: float) -> int:
    """Poll until used GPU memory is back within MEMORY_SLACK of ``baseline``:
    0 when it is, else the bytes still in use above ``baseline`` after
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        excess = gpu_memory_used() - baseline
        if excess <= MEMORY_SLACK:
            return 0
        if time.monotonic() > deadline:
            return excess
        time.sleep(0.5)


@pytest.fixture(scope="session")
def gpu_memory() -> Callable[[], int]:
    """``gpu_memory()``: bytes used on all GPUs now (see gpu_memory_used)."""
    return gpu_memory_used


@pytest.fixture(scope="session")
def gpu_memory_back() -> Callable[[int, float], int]:
    """``gpu_memory_back(baseline, within)``: see wait_memory_back."""
    return wait_memory_back


# -- in-process engines ----------------------------------------------------------------
# In-process engines start their processes with spawn unless a test says
# otherwise: this pytest process has run CPU torch (OpenMP pools, reference
# forwards) and holds threads, which a forked engine core would inherit half
# alive; vLLM's own CI spawns for the same reason. The fork path users get by
# default is tested where they get it, in fresh processes (test_gpu_processes.py).
IN_PROCESS_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


@contextmanager
def _engine(model: Path | str, env: Mapping[str, str] | None = None, **kwargs: Any) -> Iterator[Any]:
    """A ``vllm.LLM`` on ``model`` with IN_PROCESS_ENV and ``env`` set while
    it lives (vLLM's engine processes read their settings from the
    environment they start with; the client reads
    VLLM_ALLOW_INSECURE_SERIALIZATION per message). On exit the engine is
    shut down and its GPU memory has been returned, so the next engine of the
    session finds the memory it asks for."""
    from vllm import LLM

    baseline = gpu_memory_used()
    kwargs.setdefault("gpu_memory_utilization", 0.5)
    kwargs.setdefault("seed", 0)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**IN_PROCESS_ENV, **(env or {})}.items():
            patch.setenv(key, value)
        llm = LLM(model=str(model), **kwargs)
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            wait_memory_back(baseline, within=60)


@pytest.fixture(scope="session")
def gpu_engine() -> Callable[..., Any]:
    """``with gpu_engine(model_dir, env={...}, **LLM_kwargs) as llm:`` (see _engine)."""
    return _engine


def kill_alive(processes: list) -> None:
    """SIGKILL those of ``processes`` (psutil.Process objects a test started)
    that are still alive: a failed test must not leave an engine holding GPU
    memory for the next one."""
    import psutil

    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="session")
def reap() -> Callable[[list], None]:
    """``reap(processes)``: see kill_alive."""
    return kill_alive
