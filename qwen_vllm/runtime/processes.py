"""Engine processes that die with their parent and keep out of the terminal.

vLLM's engine core watches nothing above it: ``kill -9`` of an API server
leaves its engine core (and that one's workers) running, holding memory, cores
or a GPU. And Ctrl-C in a terminal signals the whole foreground process group,
so in ``qwen-vllm chat --model`` it would reach the engine, which shuts down
on SIGINT. Launchers ask for what they need in the environment (inherited by
every process vLLM starts):

* DIE_WITH_PARENT_ENV: the kernel SIGTERMs the process when its parent dies
  (vLLM's own handler then shuts it down cleanly);
* OWN_PROCESS_GROUP_ENV: the process moves to a process group of its own.

The hooks must run in every process vLLM starts, whatever its start method.
Under ``spawn`` (vLLM's CPU platform) each process imports the plugin afresh
and ``register()`` runs there. Under ``fork`` (vLLM's default on CUDA) a child
inherits the parent's "already registered" state and ``register()`` never
runs again; :func:`install_process_hooks` registers an at-fork handler, which
forked children inherit and run at birth.

And the memory they keep: :func:`release_freed_memory` gives what model
loading freed back to the OS (the model's hook calls it).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

PR_SET_PDEATHSIG = 1
DIE_WITH_PARENT_ENV = "QWEN_VLLM_DIE_WITH_PARENT"
OWN_PROCESS_GROUP_ENV = "QWEN_VLLM_ENGINE_OWN_PROCESS_GROUP"
# A file that gets one line per vLLM engine-core process started (the test
# suite counts its engine starts with it).
ENGINE_LOG_ENV = "QWEN_VLLM_ENGINE_LOG"

_installed = False
_forking_pid: int | None = None  # set in the parent just before each fork


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def child_process_setup(parent_pid: int) -> None:
    """In a process started by ``parent_pid``: apply what the environment asks
    for (see the module doc). Cheap and idempotent."""
    if os.environ.get(OWN_PROCESS_GROUP_ENV) == "1" and os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)
    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        die_with_parent()
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)


def resident_bytes() -> int:
    """This process's resident memory (RSS), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def tree_resident_bytes(pid: int | None = None) -> int:
    """Resident memory of process ``pid`` (this one) and every process under
    it, summed; processes that end while it is read count nothing (0 when
    ``pid`` itself is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def release_freed_memory() -> int:
    """Hand the memory this process has freed back to the OS (glibc's
    ``malloc_trim``); returns by how much its RSS fell.

    Loading a model frees far more than it keeps: each checkpoint tensor read,
    the float copy a quantized layer is repacked from. glibc keeps freed blocks
    below its mmap threshold (up to 32 MiB) for reuse, so without this they
    stay in RSS for the engine's life: measured 0.19 GiB for Qwen-1.8B's
    shape in bf16 and 0.27 GiB as GPTQ Int4 on CPU, eager (docs/performance.md).
    Nothing happens under another allocator (tcmalloc from LD_PRELOAD) or libc."""
    before = resident_bytes()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0
    return max(0, before - resident_bytes())


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _forking_pid is not None:
        child_process_setup(_forking_pid)


def install_process_hooks() -> None:
    """Run the hooks now if this is a spawned child (``register()`` calls this
    in every process that loads the plugin), and in every child this process
    forks from now on."""
    global _installed
    if _installed:
        return
    _installed = True
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        child_process_setup(parent.pid)
        log = os.environ.get(ENGINE_LOG_ENV)
        if log and multiprocessing.current_process().name.startswith("EngineCore"):
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _cgroup_files() -> list[str]:
    """This process's memory-cgroup counter files, v2 then v1 (either may be
    mounted at its root inside a container)."""
    paths: list[str] = []
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    paths += [f"/sys/fs/cgroup{path}/memory.events", "/sys/fs/cgroup/memory.events"]
                elif "memory" in controllers.split(","):
                    paths += [f"/sys/fs/cgroup/memory{path}/memory.oom_control", "/sys/fs/cgroup/memory/memory.oom_control"]
    except OSError:
        pass
    return paths


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended in this memory
    cgroup (``oom_kill`` of memory.events, cgroup v2, or memory.oom_control,
    v1); None where the kernel does not say."""
    for path in _cgroup_files():
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def exit_cause(returncode: int, oom_kills_before: int | None = None) -> str:
    """Why a child exited, in words: its signal or exit code, and whether the
    OOM killer acted since ``oom_kills_before`` (counted by :func:`oom_kills`)."""
    if returncode < 0:
        try:
            cause = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            cause = f"killed by signal {-returncode}"
    else:
        cause = f"exit code {returncode}"
    now = oom_kills()
    if oom_kills_before is not None and now is not None and now > oom_kills_before:
        cause += f" -- the kernel's OOM killer ended {now - oom_kills_before} process(es) meanwhile (out of memory)"
    return cause
