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


def test_avx2_emulation_loads_what_an_avx2_cpu_loads() -> None:
    """``bench --cpu-isa avx2``: a process started with ``avx2_environment()``
    sees an AVX2-only CPU in PyTorch, in ``cpu_caps()`` and in vLLM, which loads
    its ``_C_AVX2`` library (on an AVX2 CPU that is simply so); oneDNN and MKL
    are capped by their own variables."""
    import json
    import subprocess
    import sys

    from qwen_vllm.bench.engine import child_env

    code = (
        "import json, torch, vllm._custom_ops\n"
        "from qwen_vllm.runtime.cpu import cpu_caps\n"
        "maps = open('/proc/self/maps').read()\n"
        "libs = [n for n in ('vllm/_C.abi3', 'vllm/_C_AVX2', 'vllm/_C_AVX512') if n in maps]\n"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), cpu_caps().isa, cpu_caps().float_dtype, libs]))\n"
    )
    env = child_env(cpu.avx2_environment(child_env()))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["AVX2", "AVX2 only", "float32", ["vllm/_C_AVX2"]]
    assert (env["ONEDNN_MAX_CPU_ISA"], env["MKL_ENABLE_INSTRUCTIONS"]) == ("AVX2", "AVX2")
    assert cpu.ISA_ENV not in os.environ  # this process is left as it is
