"""``qwen-vllm bench profile --size 7B`` completes on a GPU: the README's
"reproduce the full-size table" promise, at the real Qwen-7B config shape
(vLLM's ``load_format="dummy"``: no download, random weights).

The smallest run that still means "completes": both rows of the profile table
(batch 1 and batch 2), a handful of new tokens, one round. The figures
themselves are not asserted (only that they exist and are positive); the
files are the ones the README promises (markdown table, JSON, PNG).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NEW_TOKENS = 16
BATCH = 2
TIMEOUT_S = 1800
# Qwen-7B in bfloat16 is 14.4 GiB of weights (config shapes: 7.72e9 parameters).
MIN_GPU_GIB = 20
# The bench starts a job only when the host has the weights' size x 1.1 + the
# KV-cache setting + 1.5 GiB free (qwen_vllm/bench/report.py run_job ->
# bench/engine.py wait_for_memory), GPU or not: 15.8 + 1 (tests/conftest.py sets
# VLLM_CPU_KVCACHE_SPACE=1) + 1.5 GiB.
MIN_HOST_GIB = 19


@pytest.fixture(scope="module")
def profile_7b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """(results folder, exit code, log) of one ``qwen-vllm bench profile --size 7B``."""
    import psutil
    from vllm.platforms import current_platform

    gpu_gib = current_platform.get_device_total_memory() / 2**30
    if gpu_gib < MIN_GPU_GIB:
        pytest.skip(f"the Qwen-7B shape in bfloat16 needs a GPU of {MIN_GPU_GIB} GiB; this one has {gpu_gib:.0f} GiB")
    host_gib = psutil.virtual_memory().available / 2**30
    if host_gib < MIN_HOST_GIB:
        pytest.skip(f"qwen-vllm bench waits for {MIN_HOST_GIB} GiB of free host memory before the 7B job, {host_gib:.0f} free")
    from qwen_vllm.bench.serving import stop_group

    root = tmp_path_factory.mktemp("bench-gpu")
    out, log = root / "out", root / "profile.log"
    cmd = [sys.executable, "-m", "qwen_vllm.cli", "bench", "profile", "--size", "7B", "--new-tokens", str(NEW_TOKENS),
           "--batch", str(BATCH), "--rounds", "1", "--out", str(out)]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            stop_group(proc)  # a hung run leaves no engine on the GPU
    return out, code, log.read_text(errors="replace")


def test_profile_7b_completes(profile_7b: tuple[Path, int, str]) -> None:
    out, code, log = profile_7b
    assert code == 0, f"bench profile --size 7B failed (exit code {code}):\n{log[-4000:]}"
    result = json.loads((out / "profile.json").read_text())
    assert result["mode"] == "profile" and result["size"] == "7B" and result["load_format"] == "dummy"
    assert result["model_label"] == "Qwen-7B shape (random weights)"
    assert result["dtype"] == "bfloat16"  # the bench's GPU default
    rows = result["data"]["rows"]
    assert sorted(r["batch"] for r in rows) == [1, BATCH]
    for row in rows:
        assert row["target"] == "wrapper" and row["new_tokens"] == NEW_TOKENS
        assert row["tok_s"] > 0 and row["peak_rss_gib"] > 0
    md = (out / "profile.md").read_text()
    assert md.startswith("## qwen-vllm bench profile: Qwen-7B shape (random weights), bfloat16") and "|---|" in md
    png = (out / "profile.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
