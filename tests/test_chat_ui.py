"""The web UI in a real browser and the CLI in a real terminal, against a real
vLLM OpenAI server on the scripted fixture (one server for the module).

What reached the model is checked on the server, not in the page: vLLM's
/metrics counts prompt tokens, and each request's count must equal the ChatML
ids of exactly the conversation we expect (system prompt, raw history, new
message). A UI that mangled history (Qwen's web_demo stored HTML), kept a
regenerated reply, ignored the system prompt or failed to clear would send
different tokens.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from qwen_vllm.chat_template import DEFAULT_SYSTEM, render_messages
from qwen_vllm.checkpoints.fixtures import CHAT_REPLY
from qwen_vllm.runtime.ports import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Raw text the old web demo would have turned into HTML (<br>, &nbsp;, escapes).
USER_1 = 'Raw <b>text</b> & "quotes"\n  two  spaces **not bold** 你好'
USER_2 = "And a second question?"
SYSTEM_2 = "You are a terse pirate. Answer in one line."


# -- helpers -----------------------------------------------------------------
def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_process(cmd: list[str], log_path: Path, ready_url: str, timeout: float) -> subprocess.Popen:
    """Start a server process; wait until ``ready_url`` answers 200."""
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{cmd[2]} exited with {proc.returncode}:\n{tail}")
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, f"{ready_url} to answer", interval=1.0)
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Metrics:
    """vLLM's Prometheus counters: what the server really received."""

    def __init__(self, base: str) -> None:
        self.url = base + "/metrics"

    def value(self, name: str) -> float:
        text = httpx.get(self.url, timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def prompt_tokens(self) -> float:
        return self.value("vllm:prompt_tokens_total")

    def running(self) -> float:
        return self.value("vllm:num_requests_running")

    def new_prompt_tokens(self, before: float, timeout: float = 120) -> int:
        """Prompt tokens of the one request made since ``before`` was read."""
        wait_for(lambda: self.prompt_tokens() > before, timeout, "the server to receive a request")
        time.sleep(0.3)
        return int(self.prompt_tokens() - before)


def chatml_len(tok, system: str, *turns: str) -> int:
    """ChatML ids the server should see for system + alternating user/assistant turns."""
    messages = [{"role": "system", "content": system}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return len(render_messages(tok, messages))


# -- module fixtures -----------------------------------------------------------
@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat-ui-logs")


@pytest.fixture(scope="module")
def api_server(openai_server: str) -> str:
    """vLLM's own OpenAI server on the scripted fixture (the session's, conftest)."""
    return openai_server


@pytest.fixture(scope="module")
def metrics(api_server: str) -> Metrics:
    return Metrics(api_server)


@pytest.fixture(scope="module")
def web_ui(api_server: str, logs_dir: Path) -> Iterator[str]:
    """``python -m qwen_vllm.ui.web`` pointed at the server (base URL without /v1)."""
    port = free_port()
    cmd = [sys.executable, "-m", "qwen_vllm.ui.web", "--api-url", api_server, "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    proc = start_process(cmd, logs_dir / "web-ui.log", url, timeout=180)
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="qwen-vllm-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(60_000)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


# -- page helpers ----------------------------------------------------------------
BOT = '#chat [data-testid="bot"]'
USER = '#chat [data-testid="user"]'
RECORD_JS = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    if (!bots.length) return;
    const t = bots[bots.length - 1].innerText.trim();
    if (window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
  }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
}"""


def open_ui(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#status")
    return page


def send(page, text: str) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


# Draw each character in the reply bubble's own font, and the private-use
# U+E000 (no font has it: the browser draws its "missing glyph" box). A
# character drawn exactly like that box is tofu.
GLYPHS_JS = """(chars) => {
  const el = document.querySelector('#chat [data-testid="bot"]');
  const font = getComputedStyle(el).font;
  const draw = (c) => {
    const canvas = document.createElement('canvas');
    canvas.width = canvas.height = 64;
    const ctx = canvas.getContext('2d');
    ctx.font = font.replace(/\\d+(\\.\\d+)?px/, '40px');
    ctx.fillStyle = '#000';
    ctx.fillText(c, 4, 48);
    return Array.from(ctx.getImageData(0, 0, 64, 64).data).join(',');
  };
  const tofu = draw('\\uE000');
  return chars.map((c) => ({ c, inked: draw(c) !== draw(' '), tofu: draw(c) === tofu }));
}"""


def bot_texts(page) -> list[str]:
    return [t.strip() for t in page.locator(BOT).all_inner_texts()]


def wait_last_bot(page, check: Callable[[str], bool], what: str, timeout: float = 120) -> str:
    def last() -> str | None:
        texts = bot_texts(page)
        return texts[-1] if texts and check(texts[-1]) else None

    try:
        return wait_for(last, timeout, what)  # type: ignore[return-value]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the chat shows {bot_texts(page)[-3:]!r}") from None


def wait_reply(page) -> None:
    wait_last_bot(page, lambda t: t == CHAT_REPLY, "the scripted reply in the chat")


def setting_box(page, name: str):
    if not page.locator(f"#{name} textarea").is_visible():
        page.get_by_text("More settings").click()
    return page.locator(f"#{name} textarea")


def no_error_toast(page) -> None:
    """Gradio shows uncaught handler exceptions as toasts; we never raise."""
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()


# -- web UI tests ----------------------------------------------------------------
def test_web_ui_chat_regenerate_system_prompt_clear(
    browser, web_ui, api_server, metrics, qwen_tokenizer, artifacts_dir
):
    page = open_ui(browser, web_ui)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Connected')")
    assert api_server + "/v1" in page.inner_text("#status")
    assert page.locator("#model input").input_value().endswith("scripted-chat")  # from /v1/models
    page.evaluate(RECORD_JS)

    # 1. A message streams in; the model saw exactly system + the raw message.
    before = metrics.prompt_tokens()
    send(page, USER_1)
    wait_reply(page)
    assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, DEFAULT_SYSTEM, USER_1)
    seen = page.evaluate("window.__seen")
    partial = [t for t in seen if t and t != CHAT_REPLY]
    assert partial and all(CHAT_REPLY.startswith(t) for t in partial), seen  # grew piece by piece
    assert page.locator("#message textarea").input_value() == ""

    # 2. Regenerate replaces the reply: same context, one user + one bot bubble.
    before = metrics.prompt_tokens()
    page.click("#regenerate")
    assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, DEFAULT_SYSTEM, USER_1)
    wait_reply(page)
    assert page.locator(USER).count() == 1 and bot_texts(page) == [CHAT_REPLY]

    # 3. A second turn carries the first exchange as raw text (emoji, CJK, <b>, newlines).
    before = metrics.prompt_tokens()
    send(page, USER_2)
    wait_for(lambda: bot_texts(page) == [CHAT_REPLY, CHAT_REPLY], 120, "the second reply")
    assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, DEFAULT_SYSTEM, USER_1, CHAT_REPLY, USER_2)

    # 4. A new system prompt is used by the next request (here: regenerate).
    page.locator("#system textarea").fill(SYSTEM_2)
    before = metrics.prompt_tokens()
    page.click("#regenerate")
    assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, SYSTEM_2, USER_1, CHAT_REPLY, USER_2)
    wait_for(lambda: bot_texts(page) == [CHAT_REPLY, CHAT_REPLY], 120, "regenerated second reply")
    page.screenshot(path=str(artifacts_dir / "web_ui_chat.png"), full_page=True)
    # The reply's Chinese and emoji render as glyphs, not boxes (Noto CJK and
    # emoji fonts: scripts/setup.sh), so the screenshot shows the real text.
    glyphs = page.evaluate(GLYPHS_JS, ["你", "好", "世", "界", "🦙"])
    assert all(g["inked"] and not g["tofu"] for g in glyphs), glyphs

    # 5. Clear empties the chat and the conversation the model sees; an
    #    emptied system box means an empty system prompt, not a server default.
    page.click("#clear")
    wait_for(lambda: page.locator(BOT).count() == 0 and page.locator(USER).count() == 0, 30, "an empty chat")
    page.locator("#system textarea").fill("")
    before = metrics.prompt_tokens()
    send(page, USER_2)
    wait_reply(page)
    assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, "", USER_2)
    assert page.locator(USER).count() == 1
    no_error_toast(page)
    page.close()


def test_web_ui_stop_aborts_the_request(browser, web_ui, metrics, qwen_tokenizer):
    page = open_ui(browser, web_ui)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Connected')")
    # min_new_tokens hides <|im_end|>: the reply runs on for ~500 tokens unless stopped.
    setting_box(page, "min_new_tokens").fill("500")
    send(page, "Talk for a long time.")
    wait_last_bot(page, lambda t: len(t) > len(CHAT_REPLY) + 5, "a long reply to be streaming")
    assert metrics.running() == 1
    page.click("#stop")
    wait_for(lambda: metrics.running() == 0, 15, "the server to abort the stopped request")
    stopped = bot_texts(page)[-1]
    time.sleep(1.5)
    assert bot_texts(page)[-1] == stopped  # nothing more arrives

    # The stopped reply is dropped by Regenerate, which now gets the normal reply.
    setting_box(page, "min_new_tokens").fill("")
    before = metrics.prompt_tokens()
    page.click("#regenerate")
    assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, DEFAULT_SYSTEM, "Talk for a long time.")
    wait_reply(page)
    no_error_toast(page)
    page.close()


def test_web_ui_api_errors_are_chat_messages(browser, web_ui, api_server):
    page = open_ui(browser, web_ui)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Connected')")

    # A setting the server would reject never leaves the browser's session.
    setting_box(page, "top_k").fill("abc")
    send(page, "hello")
    text = wait_last_bot(page, lambda t: "Invalid setting" in t, "the invalid-setting notice")
    assert "top_k must be int in [0, inf), got 'abc'" in text
    setting_box(page, "top_k").fill("")

    # A model the server does not serve: its 404, in words.
    model = page.locator("#model input")
    model.fill("no-such-model")
    model.press("Enter")
    send(page, "hello again")
    text = wait_last_bot(page, lambda t: "HTTP 404" in t, "the 404 notice")
    assert f"The API at {api_server}/v1 answered HTTP 404" in text and "no-such-model" in text
    assert "Traceback" not in page.inner_text("body")
    no_error_toast(page)
    page.close()


class _NoWorkerFront(http.server.BaseHTTPRequestHandler):
    """An OpenAI front with no worker registered yet: /v1/models lists none."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b'{"object": "list", "data": []}'
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def unserved_apis() -> Iterator[dict[str, str]]:
    """A URL where nothing listens, and one that serves no model."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoWorkerFront)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"down": f"http://127.0.0.1:{free_port()}/v1", "no-model": f"http://127.0.0.1:{server.server_port}/v1"}
    server.shutdown()


@pytest.mark.parametrize(
    ("case", "expected"),
    [("down", "Cannot reach the API at {url}"), ("no-model", "No model is served at {url} yet")],
)
def test_web_ui_without_a_model(browser, unserved_apis, case, expected):
    from qwen_vllm.ui.web import build_ui

    url = unserved_apis[case]
    expected = expected.format(url=url)
    port = free_port()
    demo = build_ui(url, timeout=20).queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        page = open_ui(browser, f"http://127.0.0.1:{port}/")
        page.wait_for_function(f"document.querySelector('#status').innerText.includes({expected!r})")
        send(page, "is anybody there?")
        text = wait_last_bot(page, lambda t: expected in t, f"the {case!r} notice", timeout=30)
        assert text.startswith("⚠️")
        assert page.locator(USER).count() == 1  # the message stays visible
        page.click("#regenerate")  # retrying says the same, no hang, no toast
        wait_for(lambda: [expected in t for t in bot_texts(page)] == [True], 30, "the notice again")
        no_error_toast(page)
        page.close()
    finally:
        demo.close()


# -- CLI tests --------------------------------------------------------------------
def spawn_cli(*args: str, timeout: float):
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen_vllm.cli", "chat", *args],
        encoding="utf-8",
        codec_errors="replace",
        timeout=timeout,
        dimensions=(50, 250),
        env=dict(os.environ, TERM="xterm"),
    )
    return child


PROMPT = "User> "


def cli_do(child, line: str, *expect: str) -> str:
    """Send a line; expect each pattern (regex-escaped) in order, then the prompt."""
    child.sendline(line)
    for pattern in expect:
        child.expect(re.escape(pattern))
    child.expect(re.escape(PROMPT))
    return child.before


def cli_stop_a_long_reply(child, running: Callable[[], float] | None) -> None:
    """Ctrl-C mid-reply stops it, keeps what was shown, and leaves the REPL alive."""
    cli_do(child, ":conf min_new_tokens=500 max_new_tokens=512", "set min_new_tokens=500, max_new_tokens=512")
    child.sendline("Talk for a long time.")
    child.expect(re.escape(CHAT_REPLY))  # the scripted sentence, then (im_end hidden) it runs on
    if running is not None:
        assert running() == 1
    child.sendintr()
    child.expect(re.escape("[stopped]"), timeout=30)
    child.expect(re.escape(PROMPT))
    if running is not None:
        wait_for(lambda: running() == 0, 15, "the server to abort the stopped request")
    cli_do(child, ":reset-conf", "settings reset")
    history = cli_do(child, ":history", "[1] User: Talk for a long time.")
    assert CHAT_REPLY in history  # the partial reply is kept
    cli_do(child, ":clh", "conversation forgotten")


def cli_max_tokens_take_effect(child) -> None:
    """:conf changes the next reply (Qwen's :conf changed nothing)."""
    cli_do(child, ":conf max_new_tokens=5", "set max_new_tokens=5")
    out = cli_do(child, "short please", "Qwen: ")
    reply = out.strip()
    assert reply and CHAT_REPLY.startswith(reply) and len(reply) < len(CHAT_REPLY) / 2, out
    cli_do(child, ":reset-conf", "settings reset")
    cli_do(child, ":clh", "conversation forgotten")


def test_cli_api_commands(api_server, metrics, qwen_tokenizer):
    import pexpect

    child = spawn_cli("--api", api_server, timeout=120)
    try:
        child.expect(re.escape(f"Qwen chat (API {api_server}/v1, model "))
        child.expect(re.escape(PROMPT))
        cli_do(child, ":help", ":conf [key=value ...]", ":reset-conf")
        cli_do(child, ":what", "unknown command ':what'")

        before = metrics.prompt_tokens()
        cli_do(child, "hello", f"Qwen: {CHAT_REPLY}")
        assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, DEFAULT_SYSTEM, "hello")
        cli_do(child, ":history", "[1] User: hello", f"Qwen: {CHAT_REPLY}")

        cli_do(child, ":system " + SYSTEM_2, "system prompt set: " + SYSTEM_2)
        cli_do(child, ":system", "system prompt: " + SYSTEM_2)
        before = metrics.prompt_tokens()
        cli_do(child, "second", f"Qwen: {CHAT_REPLY}")
        assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, SYSTEM_2, "hello", CHAT_REPLY, "second")

        cli_do(child, ":clear-history", "conversation forgotten")
        cli_do(child, ":his", "(no conversation yet)")
        before = metrics.prompt_tokens()
        cli_do(child, "third", f"Qwen: {CHAT_REPLY}")
        assert metrics.new_prompt_tokens(before) == chatml_len(qwen_tokenizer, SYSTEM_2, "third")
        cli_do(child, ":clh", "conversation forgotten")

        # :seed and :conf: validated, listed, reset; bad input changes nothing.
        cli_do(child, ":seed 7", "seed = 7")
        cli_do(child, ":seed", "seed = 7")
        cli_do(child, ":conf temperature=abc", "error: temperature must be float in [0, 2], got 'abc'")
        cli_do(child, ":conf top_p=1.5", "error: top_p must be float in (0, 1], got 1.5")
        cli_do(child, ":conf tempurature=0.5", "error: unknown setting 'tempurature' (did you mean temperature?)")
        cli_do(child, ":conf __import__('os')=1", "error: unknown setting")
        cli_do(child, ":conf temperature=0.5 top_k=3", "set temperature=0.5, top_k=3")
        listing = cli_do(child, ":conf")
        assert re.search(r"temperature\s+0\.5 \(set\)", listing) and re.search(r"top_k\s+3 \(set\)", listing)
        assert re.search(r"seed\s+7 \(set\)", listing) and re.search(r"top_p\s+\(server default\)", listing)
        cli_do(child, "with settings", f"Qwen: {CHAT_REPLY}")  # accepted by the server
        cli_do(child, ":reset-conf", "settings reset")
        listing = cli_do(child, ":conf")
        assert re.search(r"temperature\s+\(server default\)", listing)
        assert re.search(r"seed\s+\(server default\)", listing)
        cli_do(child, ":clh", "conversation forgotten")

        cli_max_tokens_take_effect(child)
        cli_stop_a_long_reply(child, metrics.running)

        # At the prompt: a hint, not an exit. CPython's readline shows the prompt
        # before it waits in select(); a SIGINT in between is only seen at the next
        # keystroke, so give it time to wait, and press again if the press was lost.
        for _ in range(3):
            time.sleep(1)
            child.sendintr()
            if child.expect([re.escape("(Ctrl-C stops a reply; :exit or Ctrl-D quits)"), pexpect.TIMEOUT], 10) == 0:
                break
        else:
            raise AssertionError("Ctrl-C at the prompt showed no hint")
        child.expect(re.escape(PROMPT))
        cli_do(child, ":clear", "\x1b[H\x1b[2J")
        child.sendline(":exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_cli_api_server_down():
    import pexpect

    url = f"http://127.0.0.1:{free_port()}/v1"
    child = spawn_cli("--api", url, timeout=60)
    try:
        child.expect(re.escape(f"warning: Cannot reach the API at {url}"))
        cli_do(child, "hello", f"error: Cannot reach the API at {url}")
        cli_do(child, ":history", "(no conversation yet)")  # a failed turn is not kept
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_cli_bad_adapter_fails_before_the_engine(scripted_model, random_model, tmp_path):
    """An adapter that does not fit the checkpoint ends ``chat --model`` with
    the reason before any engine starts (exit 2, no traceback)."""
    from qwen_vllm.checkpoints.lora import make_adapter
    from qwen_vllm.runtime.processes import ENGINE_LOG_ENV

    engines = Path(os.environ[ENGINE_LOG_ENV])  # each engine process appends its pid (tests/conftest.py)
    started = engines.read_text() if engines.exists() else ""
    other = make_adapter(random_model, tmp_path / "for-random", rank=8)
    for spec, reason in ((f"x={other}", "is the adapter for another base model"), ("x", "expected NAME=PATH")):
        out = subprocess.run(
            [sys.executable, "-m", "qwen_vllm.cli", "chat", "--model", str(scripted_model), "--lora-modules", spec],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2 and reason in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (engines.read_text() if engines.exists() else "") == started  # no engine was started


# A user's own launcher: a script that runs the CLI at its top level, with no
# ``if __name__ == "__main__"`` guard (as the Qwen README's snippets build the
# model). vLLM's CPU backend spawns its processes, which re-import __main__.
UNGUARDED_LAUNCHER = """
import sys
from qwen_vllm.cli import main
sys.exit(main(["chat", *sys.argv[1:]]))
"""


class StartingCli:
    """``qwen-vllm chat --model`` started at module set-up from an unguarded
    script, so its engine loads while the API server starts (the slowest part
    of this module, twice); a thread drains its output until the first prompt
    so the pty never fills. Where this CPU can hold an FP8 KV cache the engine
    stores one (``kv``)."""

    def __init__(self, model: Path, adapter: Path, launcher: Path, kv: str) -> None:
        import pexpect

        launcher.write_text(UNGUARDED_LAUNCHER)
        args = ["--model", str(model), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
                "--kv-cache-dtype", kv, "--lora-modules", f"tuned={adapter}"]  # fmt: skip
        self.child = pexpect.spawn(
            sys.executable, [str(launcher), *args], encoding="utf-8", codec_errors="replace", timeout=900,
            dimensions=(50, 250), env=dict(os.environ, TERM="xterm"),
        )  # fmt: skip
        self.kv = kv
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._wait_prompt, daemon=True)
        self.thread.start()

    def _wait_prompt(self) -> None:
        try:
            self.child.expect(re.escape(PROMPT))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            self.error = exc

    def ready(self):
        self.thread.join(900)
        if self.error is not None:
            raise self.error
        return self.child


@pytest.fixture(scope="module", autouse=True)
def inprocess_cli(request, scripted_model: Path, tmp_path_factory) -> Iterator[StartingCli | None]:
    from qwen_vllm.checkpoints.lora import make_adapter

    if not any(item.name == "test_cli_in_process_model" for item in request.session.items):
        yield None  # not selected: start no engine
        return
    from qwen_vllm.runtime.cpu import cpu_caps

    # strength 2: the scripted model's margins are wide; the adapter must change its words
    root = tmp_path_factory.mktemp("cli-adapter")
    adapter = make_adapter(scripted_model, root / "tuned", rank=8, seed=1, strength=2.0)
    cli = StartingCli(scripted_model, adapter, root / "my_chat.py", "fp8" if cpu_caps().fp8_kv_cache else "auto")
    yield cli
    cli.child.close(force=True)


def test_cli_in_process_model(inprocess_cli, scripted_model):
    """``--model``: vLLMWrapper in the CLI process, run from an unguarded
    script (the engine's spawned processes must not run it again); Ctrl-C must
    not kill its engine. With an FP8 KV cache the greedy replies are the
    scripted ones, token for token."""
    import pexpect

    child = inprocess_cli.ready()
    kv = "" if inprocess_cli.kv == "auto" else f", KV cache {inprocess_cli.kv}"
    assert f"Qwen chat (in-process vLLM, model {scripted_model}{kv})" in child.before
    assert child.before.count(f"Loading {scripted_model} (") == 1  # the script ran once
    child.timeout = 120
    cli_do(child, "hello", CHAT_REPLY)
    cli_do(child, ":clh", "conversation forgotten")
    cli_stop_a_long_reply(child, None)
    # The engine survived the Ctrl-C (vLLM's engine core exits on SIGINT).
    cli_do(child, "still there?", CHAT_REPLY)
    cli_do(child, ":clh", "conversation forgotten")
    cli_max_tokens_take_effect(child)
    # --lora-modules: the adapter is listed beside the model and answers in its own words.
    listing = cli_do(child, ":model", "* scripted-chat", "  tuned")
    cli_do(child, ":model tuned", "model set: tuned")
    cli_do(child, ":conf do_sample=false", "set do_sample=False")
    tuned = cli_do(child, "hello", "Qwen: ").strip()
    assert tuned and CHAT_REPLY not in tuned, (listing, tuned)
    cli_do(child, ":model scripted-chat", "model set: scripted-chat")
    cli_do(child, "hello", CHAT_REPLY)
    child.sendline(":exit")
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.exitstatus == 0
