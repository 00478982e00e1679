"""Engine-process hooks under both start methods (no engine).

vLLM starts its engine processes with ``spawn`` on CPU and ``fork`` on CUDA.
A parent process loads the plugin (``register()``) the way vLLM's API server
does, then starts a child with each start method; the child must leave the
parent's process group and die when the parent is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qwen_vllm.runtime.processes import (
    DIE_WITH_PARENT_ENV,
    OWN_PROCESS_GROUP_ENV,
    exit_cause,
    oom_kills,
    resident_bytes,
    tree_resident_bytes,
)

# 300 MB in 100 KB blocks (below glibc's mmap threshold: from its heap), all
# freed but the last; prints RSS after the frees, what release_freed_memory
# reports, and RSS after it.
FREED = """
import json, sys
from qwen_vllm.runtime.processes import release_freed_memory, resident_bytes
blocks = [bytearray(100_000) for _ in range(3000)]
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])  # touch every page
keep = blocks[-1]
del blocks
before = resident_bytes()
freed = release_freed_memory()
print(json.dumps([before, freed, resident_bytes()]))
"""

# vLLM loads its general plugins (our register()) in the API server and in
# every process it starts; under fork the child inherits them as loaded.
PARENT = """
import multiprocessing, sys, time
from vllm.plugins import load_general_plugins

def engine_process():
    load_general_plugins()
    time.sleep(300)

if __name__ == "__main__":
    load_general_plugins()
    child = multiprocessing.get_context(sys.argv[1]).Process(target=engine_process)
    child.start()
    print(child.pid, flush=True)
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_engine_children_leave_the_group_and_die_with_the_parent(method: str, tmp_path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, DIE_WITH_PARENT_ENV: "1", OWN_PROCESS_GROUP_ENV: "1"}
    parent = subprocess.Popen([sys.executable, str(script), method], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 60  # a spawned child imports vLLM first
        while os.getpgid(child) != child and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.getpgid(child) == child != os.getpgid(parent.pid), "child stayed in the parent's process group"
        time.sleep(0.5)  # the parent-death signal is armed right after
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), f"{method} child {child} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_exit_cause_names_the_signal_code_and_oom_killer() -> None:
    """What the stack logs when a child exits: a real child killed by SIGKILL,
    one that exits 3, and the OOM killer when the cgroup's counter moved
    (forced here by a lower "before" count: no process is OOM-killed)."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    assert exit_cause(killed.wait()) == "killed by SIGKILL"
    assert exit_cause(subprocess.call([sys.executable, "-c", "raise SystemExit(3)"])) == "exit code 3"
    count = oom_kills()
    if count is None:
        pytest.skip("this kernel exposes no memory-cgroup oom_kill counter")
    assert exit_cause(-9, count) == "killed by SIGKILL"  # nothing new
    assert exit_cause(-9, count - 1).endswith("the kernel's OOM killer ended 1 process(es) meanwhile (out of memory)")


def test_release_freed_memory_hands_the_heap_back() -> None:
    """What the model's post-load hook does: memory a process freed but glibc
    kept leaves its RSS, and the function says how much (in a fresh process)."""
    out = subprocess.run([sys.executable, "-c", FREED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, freed, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert freed > 200e6, (before, freed, after)
    assert before - after == pytest.approx(freed, rel=0.05)


def test_tree_resident_bytes_counts_the_children() -> None:
    """What the benches sample: this process and every process under it; a
    child holding 200 MB adds at least that, and a pid that is gone counts 0."""
    code = "import sys; b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert tree_resident_bytes() - resident_bytes() > 200e6
        assert tree_resident_bytes(child.pid) > 200e6
    finally:
        child.communicate("", timeout=60)
    assert tree_resident_bytes(child.pid) == 0
