"""LoRA adapters through the FastChat topology (reliability_stack.py): both
workers serve the scripted model and two adapters (``--lora-modules``), each
registered with the controller as a model of its own; the front routes by
``model``; an adapter loaded at run time (vLLM's /v1/load_lora_adapter on
worker A) joins the controller's list. Driven by the official openai SDK.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from reliability_stack import (  # noqa: F401
    ADAPTERS,
    HEARTBEAT_S,
    MODEL,
    RUNTIME_ADAPTER,
    WORKER_KEY,
    topology,
)
from test_chat_ui import (  # noqa: F401 (browser is a fixture)
    PROMPT,
    bot_texts,
    browser,
    cli_do,
    open_ui,
    send,
    spawn_cli,
    start_process,
    stop_process,
    wait_for,
)

from qwen_vllm.checkpoints.fixtures import CHAT_REPLY


def reply(url: str, model: str, key: str = "none") -> tuple[str, tuple[float, ...]]:
    """The greedy reply and its tokens' log-probs."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=64, logprobs=True
    )
    choice = r.choices[0]
    return choice.message.content, tuple(t.logprob for t in choice.logprobs.content)


def same(got: tuple[str, tuple[float, ...]], want: tuple[str, tuple[float, ...]]) -> bool:
    """The same words, log-probs within float noise (batches differ between runs)."""
    (text, lps), (want_text, want_lps) = got, want
    return text == want_text and len(lps) == len(want_lps) > 0 and max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-3


def listed(url: str) -> list[str]:
    return sorted(m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).models.list().data)


def test_two_adapters_and_the_base_each_answer_as_themselves(topology) -> None:
    front = topology.front_url
    assert listed(front) == sorted([MODEL, *ADAPTERS])
    replies = {m: reply(front, m) for m in (MODEL, *ADAPTERS)}
    assert replies[MODEL][0] == CHAT_REPLY
    assert len({text for text, _ in replies.values()}) == 3, replies  # each adapter changes the reply its own way
    for name in ADAPTERS:  # the same on each worker: the front may have used either
        assert same(reply(topology.worker_url("a"), name), replies[name])
        assert same(reply(topology.worker_url("b"), name, key=WORKER_KEY), replies[name])
    # FastChat's own route picks the adapter by the request's model name too.
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    for name in (MODEL, ADAPTERS[0]):
        params = {"model": name, "prompt": prompt, "temperature": 0, "max_new_tokens": 64, "echo": False, "logprobs": 0}
        out = httpx.post(topology.worker_url("a") + "/worker_generate", json=params, timeout=60).json()
        assert out["error_code"] == 0 and same((out["text"], tuple(out["logprobs"]["token_logprobs"])), replies[name]), name


def test_unknown_adapter_is_a_404_naming_what_is_served(topology) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        reply(topology.front_url, "lora-z")
    assert "'lora-z' is not served here" in info.value.message
    assert all(name in info.value.message for name in (MODEL, *ADAPTERS))


def test_web_ui_and_cli_list_the_adapters_and_answer_as_them(topology, browser, tmp_path: Path) -> None:
    """The web UI's model menu and the CLI's ``:model`` list the adapters
    (from the front's /v1/models); picking one gets that adapter's reply."""

    import pexpect

    from qwen_vllm.runtime.ports import free_port

    front, served = topology.front_url, sorted([MODEL, *ADAPTERS])
    want = reply(front, ADAPTERS[0])[0]
    assert want != CHAT_REPLY
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_process([sys.executable, "-m", "qwen_vllm.ui.web", "--api-url", front, "--port", str(port)],
                         tmp_path / "web-ui.log", url, timeout=180)  # fmt: skip
    try:
        page = open_ui(browser, url)
        page.wait_for_function("document.querySelector('#status').innerText.includes('Connected')")
        assert f"{len(served)} models" in page.inner_text("#status")
        page.click("#model input")
        options = page.locator('#model [role="option"]')
        assert sorted(t.replace("✓", "").strip() for t in options.all_inner_texts()) == served  # ✓ marks the choice
        options.filter(has_text=ADAPTERS[0]).click()
        assert page.locator("#model input").input_value() == ADAPTERS[0]
        for slider, value in (("temperature", "0"), ("max_new_tokens", "64")):  # as reply() asks
            number = page.locator(f"#{slider} input[type=number]")
            number.fill(value)
            number.press("Enter")
        send(page, "Hello")
        # The adapter's reply (a notice follows it when it fills max_new_tokens).
        wait_for(lambda: want.strip() in bot_texts(page)[-2:], 120, f"{ADAPTERS[0]}'s reply {want.strip()!r}")
        page.close()
    finally:
        stop_process(proc)

    child = spawn_cli("--api", front + "/v1", timeout=120)
    child.expect_exact(PROMPT)
    listing = cli_do(child, ":model")
    assert sorted(line.rstrip()[2:] for line in listing.splitlines() if line.startswith(("* ", "  "))) == served, listing
    cli_do(child, ":model lora-z", "'lora-z' is not served here; served:")
    cli_do(child, f":model {ADAPTERS[0]}", f"model set: {ADAPTERS[0]}")
    cli_do(child, ":conf temperature=0 max_new_tokens=64", "set temperature=0")
    assert want in cli_do(child, "Hello", "Qwen: ")
    assert f"* {ADAPTERS[0]}" in cli_do(child, ":model")
    child.sendline(":exit")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 0


def test_adapter_loaded_at_run_time_joins_the_controller_list(topology, random_model) -> None:
    """vLLM's /v1/load_lora_adapter: a bad adapter is a 400 naming the problem
    (checked as at start-up), a good one is registered with the controller
    within a heartbeat, and unloading it takes it off the list."""
    from qwen_vllm.checkpoints.lora import make_adapter

    a_url = topology.worker_url("a")
    other = make_adapter(random_model, topology.log_dir / "adapters" / "for-random", rank=8)
    r = httpx.post(a_url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(other)}, timeout=60)
    assert r.status_code == 400 and "is the adapter for another base model?" in r.json()["error"]["message"], r.text
    r = httpx.post(a_url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"}, timeout=60)
    assert r.status_code == 400 and "/nonexistent/adapter_config.json: missing" in r.json()["error"]["message"], r.text
    r = httpx.post(a_url + "/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": RUNTIME_ADAPTER, "lora_path": str(topology.adapter_dir(RUNTIME_ADAPTER))})  # fmt: skip
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + HEARTBEAT_S + 10  # registered again at the next heartbeat; the front caches 2 s
    while RUNTIME_ADAPTER not in listed(topology.front_url):
        assert time.monotonic() < deadline, listed(topology.front_url)
        time.sleep(0.5)
    got = reply(topology.front_url, RUNTIME_ADAPTER)  # only worker A has it: the controller sends it there
    assert same(got, reply(a_url, RUNTIME_ADAPTER)) and not same(got, reply(a_url, MODEL))
    r = httpx.post(a_url + "/v1/unload_lora_adapter", json={"lora_name": RUNTIME_ADAPTER}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + HEARTBEAT_S + 10
    while RUNTIME_ADAPTER in listed(topology.front_url):
        assert time.monotonic() < deadline
        time.sleep(0.5)
