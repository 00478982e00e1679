"""Shared test set-up: environment, fixture checkpoints, one engine per kind.

Engines are slow to start on CPU (~40-60 s), so every engine or server here is
session- or module-scoped and shared. Fixture checkpoints are written once per
session. vLLM's model-inspection cache lives in a fresh directory per session
(a stale cache hides plugin failures).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="qwen-vllm-tests-"))
os.environ["VLLM_CACHE_ROOT"] = str(_SESSION_TMP / "vllm-cache")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ENGINE_LOG = _SESSION_TMP / "engine-starts"
os.environ["QWEN_VLLM_ENGINE_LOG"] = str(ENGINE_LOG)  # qwen_vllm.runtime.processes.ENGINE_LOG_ENV


def pytest_report_header(config: pytest.Config) -> str:
    from qwen_vllm.runtime.cpu import cpu_caps

    return cpu_caps().describe()


def _engine_starts() -> int:
    return len(ENGINE_LOG.read_text().split()) if ENGINE_LOG.exists() else 0


_STARTS_BY_MODULE: dict[str, int] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Count the engines each module starts (shared fixtures count where first set up)."""
    before = _engine_starts()
    yield
    if started := _engine_starts() - before:
        module = item.nodeid.split("::")[0]
        _STARTS_BY_MODULE[module] = _STARTS_BY_MODULE.get(module, 0) + started


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Engine starts are what make the suite slow: keep them counted."""
    terminalreporter.write_line(f"vLLM engine starts in this session: {_engine_starts()}")
    for module, n in sorted(_STARTS_BY_MODULE.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  {n:3d}  {module}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Fixture checkpoints and caches go with the session (hundreds of MB each run)."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    path = _SESSION_TMP / "models"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def scripted_model(fixtures_root: Path) -> Path:
    """Greedy reply to any ChatML prompt is fixtures.CHAT_REPLY, then <|im_end|>
    (with Qwen's ReAct tool instruction in it: fixtures.REACT_ACTION, and after
    "\\nThought:" fixtures.REACT_ANSWER); to the raw prompt vllm_server.STOP_PROMPT,
    " one" <|im_start|> " two" <|im_end|>."""
    from vllm_server import make_chat_and_stop_model

    return make_chat_and_stop_model(fixtures_root / "scripted-chat")


@pytest.fixture(scope="session")
def openai_server(scripted_model: Path, artifacts_dir: Path) -> Iterator[str]:
    """vLLM's own OpenAI server entry point (the README's first command) on the
    scripted fixture, given the flags ``qwen-vllm serve`` adds (serve.vllm_argv:
    tool calling and OpenAI-shaped 404s; plain chat needs none of them). Shared
    by the OpenAI chat, tool-calling, chat-UI and bench tests (one engine)."""
    from vllm_server import launch_server, stop_server

    from qwen_vllm.serving.serve import vllm_argv

    proc, base = launch_server(scripted_model, "session", artifacts_dir, *vllm_argv([]))
    yield base
    stop_server(proc)


@pytest.fixture(scope="session")
def random_model(fixtures_root: Path) -> Path:
    """Seeded random weights (hidden 128, 2 layers, 2 heads of 64)."""
    from qwen_vllm.checkpoints.fixtures import make_model

    return make_model(fixtures_root / "random", "random")


@pytest.fixture(scope="session")
def random_qwen2(random_model: Path, fixtures_root: Path) -> Path:
    """The random fixture converted to Qwen2ForCausalLM (the independent reference)."""
    from qwen_vllm.checkpoints.convert import convert_to_qwen2

    return convert_to_qwen2(random_model, fixtures_root / "random-qwen2")


@pytest.fixture(scope="session")
def qwen_tokenizer(scripted_model: Path):
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

    return QWenTokenizer(str(scripted_model / "qwen.tiktoken"))


def _wrapper(model_dir: Path, **kwargs):
    from qwen_vllm.wrapper.chat import vLLMWrapper

    opts = dict(dtype="float32", enforce_eager=True, max_model_len=2048)
    opts.update(kwargs)
    return vLLMWrapper(str(model_dir), **opts)


@pytest.fixture(scope="session")
def scripted_wrapper(scripted_model: Path):
    """One vLLMWrapper engine on the scripted fixture for the whole session."""
    wrapper = _wrapper(scripted_model)
    yield wrapper
    wrapper.llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def random_wrapper(random_model: Path):
    """One vLLMWrapper engine on the random fixture (fp32) for the whole session;
    ``.llm`` is the underlying vllm.LLM for raw-engine comparisons. LoRA is on
    (test_lora.py); requests without an adapter run the base model."""
    wrapper = _wrapper(random_model, enable_lora=True)
    yield wrapper
    wrapper.llm.llm_engine.engine_core.shutdown()
