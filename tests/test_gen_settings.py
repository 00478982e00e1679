"""The typed generation-settings table behind :conf and the web UI, and API URL
handling: no engine, no server."""

from __future__ import annotations

import pytest

from qwen_vllm.errors import QwenRequestError
from qwen_vllm.settings import (
    check_settings,
    openai_params,
    parse_assignments,
)
from qwen_vllm.ui.client import api_base_url


def test_one_table_checks_every_path():
    """The wrapper's merge, the worker's gen params and :conf read one table."""
    from qwen_vllm.settings import merge_generation
    from qwen_vllm.worker.protocol import WorkerRequestError, sampling_params

    with pytest.raises(QwenRequestError, match=r"top_p must be float in \(0, 1\], got 1.5"):
        merge_generation({}, None, {"top_p": 1.5})
    with pytest.raises(WorkerRequestError, match=r"top_p must be float in \(0, 1\], got 1.5"):
        sampling_params({"top_p": 1.5}, {}, prompt_len=3, max_model_len=64)
    with pytest.raises(QwenRequestError, match=r"top_p must be float in \(0, 1\], got 1.5"):
        parse_assignments(["top_p=1.5"])
    with pytest.raises(QwenRequestError, match="max_window_size is not a chat setting"):
        parse_assignments(["max_window_size=100"])
    assert merge_generation({"max_window_size": 6144, "top_k": 0.0}, None, {})["top_k"] == 0


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("temperature=0.7", {"temperature": 0.7}),
        ("temperature=0", {"temperature": 0.0}),
        ("top_p=1", {"top_p": 1.0}),
        ("max_new_tokens=64", {"max_new_tokens": 64}),
        ("top_k=0", {"top_k": 0}),
        ("do_sample=off", {"do_sample": False}),
        ("do_sample=True", {"do_sample": True}),
        ("presence_penalty=-2", {"presence_penalty": -2.0}),
        ("seed=1234", {"seed": 1234}),
    ],
)
def test_parse_valid(item, expected):
    parsed = parse_assignments([item])
    assert parsed == expected and type(next(iter(parsed.values()))) is type(next(iter(expected.values())))


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["top_p=0"], "top_p must be float in (0, 1], got 0.0"),
        (["temperature=2.5"], "temperature must be float in [0, 2], got 2.5"),
        (["temperature=nan"], "temperature must be finite"),
        (["max_new_tokens=0"], "max_new_tokens must be int in [1, inf), got 0"),
        (["max_new_tokens=1.5"], "max_new_tokens must be int in [1, inf), got '1.5'"),
        (["do_sample=maybe"], "do_sample must be true or false, got 'maybe'"),
        (["top_k=__import__('os').system('true')"], "top_k must be int in [0, inf)"),
        (["topp=0.5"], "unknown setting 'topp' (did you mean top_p"),
        (["temperature"], "expected key=value, got 'temperature'"),
        (["temperature="], "expected key=value"),
        ([], "expected key=value"),
    ],
)
def test_parse_rejects_with_a_message_naming_the_setting(items, message):
    with pytest.raises(QwenRequestError) as info:
        parse_assignments(items)
    assert message in str(info.value)


def test_parse_is_all_or_nothing():
    with pytest.raises(QwenRequestError, match="top_p"):
        parse_assignments(["temperature=0.5", "top_p=7"])


def test_check_settings_drops_blanks_and_types_form_values():
    assert check_settings({"temperature": 1, "max_new_tokens": 512.0, "top_k": None}) == {
        "temperature": 1.0,
        "max_new_tokens": 512,
    }
    with pytest.raises(QwenRequestError, match="max_new_tokens must be an integer"):
        check_settings({"max_new_tokens": 10.5})
    with pytest.raises(QwenRequestError, match="do_sample must be true or false"):
        check_settings({"do_sample": 1})


def test_openai_params_maps_names_and_vllm_extras():
    params = openai_params(
        {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.1, "seed": 3}
        | {"min_new_tokens": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5}
    )
    assert params == {
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.8,
        "seed": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "extra_body": {"top_k": 5, "repetition_penalty": 1.1, "min_tokens": 2},
    }
    assert openai_params({}) == {}
    assert openai_params({"do_sample": False, "temperature": 0.9}) == {"temperature": 0.0}  # greedy, as transformers


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("https://host/proxy/v1", "https://host/proxy/v1"),
    ],
)
def test_api_base_url(url, base):
    assert api_base_url(url) == base


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host/v1", "http://", ""])
def test_api_base_url_rejects(url):
    with pytest.raises(ValueError, match="API URL must look like"):
        api_base_url(url)
