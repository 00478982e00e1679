"""Our CPU defaults (runtime/cpu.py): thread binding, KV-cache space and the
opt-in LD_PRELOAD of tcmalloc and Intel OpenMP, as every launcher applies them.
An engine started with the preload is checked in test_bench.py (the live
``profile`` run records what its engine processes were started with)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen_vllm.runtime import cpu


@pytest.fixture
def libs(tmp_path: Path, monkeypatch) -> Path:
    """A library folder holding both libraries (empty files: only names count)."""
    for name in ("libtcmalloc_minimal.so.4", "libiomp5.so"):
        (tmp_path / name).touch()
    monkeypatch.setattr(cpu, "_library_dirs", lambda: [tmp_path / "absent", tmp_path])
    return tmp_path


def test_preload_adds_what_is_installed_and_keeps_what_is_set(libs: Path) -> None:
    tcmalloc, iomp = str(libs / "libtcmalloc_minimal.so.4"), str(libs / "libiomp5.so")
    assert cpu.preload_value("") == f"{tcmalloc}:{iomp}"
    assert cpu.preload_value("/opt/libfoo.so") == f"{tcmalloc}:{iomp}:/opt/libfoo.so"
    # vLLM asserts Intel and GNU OpenMP are not both preloaded; one malloc at a time.
    assert cpu.preload_value("/x/libgomp.so.1") == f"{tcmalloc}:/x/libgomp.so.1"
    assert cpu.preload_value("/x/libjemalloc.so.2") == f"{iomp}:/x/libjemalloc.so.2"
    assert cpu.preload_value(f"{tcmalloc}:{iomp}") is None
    (libs / "libiomp5.so").unlink()
    assert cpu.preload_value("") == tcmalloc


def test_apply_cpu_defaults_sets_only_what_is_unset(libs: Path, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "on_cpu", lambda: True)
    env: dict[str, str] = {}
    chosen = cpu.apply_cpu_defaults(1, env)
    assert chosen == env and env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_CPU_OMP_THREADS_BIND"]
    assert "LD_PRELOAD" not in env  # opt-in: vLLM preloads its own choice
    env = {cpu.PRELOAD_ENV: "1"}
    cpu.apply_cpu_defaults(1, env)
    assert env["LD_PRELOAD"] == f"{libs / 'libtcmalloc_minimal.so.4'}:{libs / 'libiomp5.so'}"
    mine = {"LD_PRELOAD": "/x/libgomp.so.1", "VLLM_CPU_KVCACHE_SPACE": "9", "VLLM_CPU_OMP_THREADS_BIND": "0", cpu.PRELOAD_ENV: "1"}
    env = dict(mine)
    cpu.apply_cpu_defaults(1, env)
    assert env == {**mine, "LD_PRELOAD": f"{libs / 'libtcmalloc_minimal.so.4'}:/x/libgomp.so.1"}
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)
    assert cpu.apply_cpu_defaults(1, {cpu.PRELOAD_ENV: "1"}) == {}  # GPUs: nothing


def test_engine_environment_puts_everything_back(libs: Path, monkeypatch) -> None:
    """The wrapper's engine processes inherit the preload; its caller's later
    children do not."""
    monkeypatch.setattr(cpu, "on_cpu", lambda: True)
    for name, value in ((cpu.PRELOAD_ENV, "1"), ("LD_PRELOAD", "/opt/libfoo.so"), ("VLLM_CPU_OMP_THREADS_BIND", "0"),
                        ("VLLM_CPU_KVCACHE_SPACE", "1")):  # all put back after the test
        monkeypatch.setenv(name, value)
    with cpu.engine_environment(1) as chosen:
        assert os.environ["LD_PRELOAD"] == chosen["LD_PRELOAD"] != "/opt/libfoo.so"
    assert os.environ["LD_PRELOAD"] == "/opt/libfoo.so"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    with cpu.engine_environment(1):
        assert os.environ["LD_PRELOAD"] and os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    assert "LD_PRELOAD" not in os.environ and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    with cpu.engine_environment(2):  # a later engine with another TP size binds its own cores
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
