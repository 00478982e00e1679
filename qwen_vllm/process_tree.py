"""Processes that die with their parent, so a killed server leaves no orphans.

vLLM's engine core watches nothing above it: ``kill -9`` of an API server
leaves its engine core (and that one's workers) running, holding memory and
cores. ``qwen-vllm worker`` sets DIE_WITH_PARENT_ENV; ``qwen_vllm.register()``
runs in every process vLLM spawns and then asks the kernel to SIGTERM it when
its parent dies (vLLM's own handler then shuts it down cleanly).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

PR_SET_PDEATHSIG = 1
DIE_WITH_PARENT_ENV = "QWEN_VLLM_DIE_WITH_PARENT"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def engine_process_dies_with_parent() -> None:
    """In a process vLLM spawned under DIE_WITH_PARENT_ENV: die with the parent."""
    parent = multiprocessing.parent_process()
    if os.environ.get(DIE_WITH_PARENT_ENV) != "1" or parent is None:
        return
    die_with_parent()
    if os.getppid() != parent.pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
