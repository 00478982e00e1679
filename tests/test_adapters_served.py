"""LoRA adapters through the FastChat topology (reliability_stack.py): both
workers serve the scripted model and two adapters (``--lora-modules``), each
registered with the controller as a model of its own; the front routes by
``model``; an adapter loaded at run time (vLLM's /v1/load_lora_adapter on
worker A) joins the controller's list. Driven by the official openai SDK.
"""

from __future__ import annotations

import time

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
