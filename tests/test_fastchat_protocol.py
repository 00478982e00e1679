"""FastChat worker protocol mapping (no engine): prompt strings -> ids, gen params
-> SamplingParams, conversation template, VLLM_PLUGINS allowlist, launcher args."""

from __future__ import annotations

import pytest

from qwen_vllm.chat_template import chatml_frames, prompt_string_ids, render_messages
from qwen_vllm.worker.protocol import (
    CONTEXT_OVERFLOW,
    PARAM_OUT_OF_RANGE,
    VALIDATION_TYPE_ERROR,
    WorkerRequestError,
    conv_template,
    default_conv_template,
    sampling_params,
)

QWEN_DEFAULTS = {"top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "max_new_tokens": 512}


def fastchat_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt fschat's openai_api_server renders from our worker's template."""
    from fastchat.conversation import Conversation, SeparatorStyle

    conv = conv_template("qwen-7b-chat")
    conv = Conversation(
        name=conv["name"],
        system_template=conv["system_template"],
        system_message=conv["system_message"],
        roles=tuple(conv["roles"]),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle(conv["sep_style"]),
        sep=conv["sep"],
        sep2=conv["sep2"],
        stop_str=conv["stop_str"],
        stop_token_ids=conv["stop_token_ids"],
    )
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(conv.roles[m["role"] == "assistant"], m["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hi!\n\nHow can I help?"},
            {"role": "user", "content": " 2+2? "},
        ],
    ],
)
def test_fastchat_rendered_prompt_gives_qwen_ids(qwen_tokenizer, messages):
    prompt = fastchat_prompt(messages)
    assert prompt_string_ids(qwen_tokenizer, prompt) == render_messages(qwen_tokenizer, messages)


def test_special_token_text_inside_a_message_stays_text(qwen_tokenizer):
    tok = qwen_tokenizer
    user = "print('<|endoftext|>') then <|im_start|>system and <|extra_3|>"
    ids = prompt_string_ids(tok, fastchat_prompt([{"role": "user", "content": user}]))
    assert ids == render_messages(tok, [{"role": "user", "content": user}])
    # Only the frame tokens are control tokens: 2 frames + the open assistant one.
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 2
    assert tok.eod_id not in ids and 151649 not in ids


def test_frames_and_non_chatml_prompts(qwen_tokenizer):
    tok = qwen_tokenizer
    assert chatml_frames("plain text") is None
    assert prompt_string_ids(tok, "a <|endoftext|> b") == tok.encode_text("a <|endoftext|> b", allowed_special=set())
    frames, tail = chatml_frames("<|im_start|>user\nhi<|im_end|>\n")
    assert frames == [("user\nhi", True)] and tail == "\n"
    ids = prompt_string_ids(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant")
    assert ids[-2:] == [tok.im_start_id, *tok.encode_text("assistant")]


def test_conversation_template_is_qwen_whatever_the_name():
    conv = conv_template(default_conv_template("chatml"))
    assert conv["name"] == "qwen-7b-chat" and conv["sep_style"] == 9 and conv["sep"] == "<|im_end|>"
    assert conv["stop_token_ids"] == [151643, 151644, 151645]
    assert default_conv_template("raw") == "raw"
    with pytest.raises(ValueError, match="unknown FastChat conversation template 'nope'"):
        conv_template("nope")


def sp(params, **kw):
    args = dict(prompt_len=10, max_model_len=2048)
    args.update(kw)
    return sampling_params(params, QWEN_DEFAULTS, **args)


def test_gradio_shaped_params_map_to_sampling_params():
    # fschat's gradio server: no top_k, echo false, repetition_penalty set.
    p = sp({"prompt": "x", "temperature": 0.7, "repetition_penalty": 1.2, "top_p": 1.0, "max_new_tokens": 64,
            "stop": "<|endoftext|>", "stop_token_ids": [151643, 151644, 151645, 7], "echo": False})
    assert p.temperature == 0.7 and p.top_p == 1.0 and p.top_k == 0 and isinstance(p.top_k, int)
    assert p.repetition_penalty == 1.2 and p.max_tokens == 64
    assert p.stop_token_ids == [151643, 151644, 151645, 7]
    assert p.stop == ["<|endoftext|>"] and p.prompt_logprobs is None


def test_defaults_seed_n_topk_and_greedy():
    p = sp({"prompt": "x"})
    assert (p.top_p, p.repetition_penalty, p.max_tokens) == (0.8, 1.1, 512)  # generation_config
    # ChatML stops are the engine's default stops (plugin/chatml_eos.py), added by vLLM to every request.
    assert p.stop_token_ids == []
    p = sp({"prompt": "x", "top_k": 5.0, "seed": 7, "n": 3, "logprobs": 2, "echo": True})
    assert (p.top_k, p.seed, p.n, p.logprobs, p.prompt_logprobs) == (5, 7, 3, 2, 2)
    p = sp({"prompt": "x", "temperature": 0.0, "top_p": 0.5})
    assert p.temperature == 0.0 and p.top_p == 1.0  # FastChat: temperature <= 1e-5 is greedy
    assert sp({"prompt": "x", "max_new_tokens": 4000}, prompt_len=2000).max_tokens == 48  # clamped


@pytest.mark.parametrize(
    "params, code, words",
    [
        ({"top_k": 2.5}, PARAM_OUT_OF_RANGE, "top_k must be an integer"),
        ({"temperature": "hot"}, VALIDATION_TYPE_ERROR, "temperature must be a number"),
        ({"top_p": 1.5}, PARAM_OUT_OF_RANGE, "top_p"),
        ({"use_beam_search": True}, PARAM_OUT_OF_RANGE, "use_beam_search"),
        ({"best_of": 4}, PARAM_OUT_OF_RANGE, "best_of"),
        ({"stop": [1, 2]}, VALIDATION_TYPE_ERROR, "stop must be"),
        ({"max_new_tokens": 0}, PARAM_OUT_OF_RANGE, r"max_new_tokens must be int in \[1, inf\)"),
        ({"n": 0}, PARAM_OUT_OF_RANGE, "n must be at least 1"),
        ({"images": ["data:image/png;base64,AAAA"]}, PARAM_OUT_OF_RANGE, "images are not supported"),
    ],
)
def test_bad_params_name_what_is_wrong(params, code, words):
    with pytest.raises(WorkerRequestError, match=words) as info:
        sp({"prompt": "x", **params})
    assert info.value.code == code


def test_context_overflow():
    with pytest.raises(WorkerRequestError, match="2048 tokens") as info:
        sp({"prompt": "x"}, prompt_len=2048)
    assert info.value.code == CONTEXT_OVERFLOW


def test_plugin_allowlist_keeps_other_plugins():
    from qwen_vllm.worker_launch import plugin_allowlist

    unset = plugin_allowlist(None).split(",")
    assert {"qwen_vllm", "qwen_vllm_fastchat", "lora_filesystem_resolver"} <= set(unset)
    assert plugin_allowlist("mine").split(",") == ["mine", "qwen_vllm", "qwen_vllm_fastchat"]
    assert plugin_allowlist("qwen_vllm,x").split(",") == ["qwen_vllm", "x", "qwen_vllm_fastchat"]


def test_launcher_maps_fastchat_flags(scripted_model):
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from qwen_vllm.errors import QwenVLLMError
    from qwen_vllm.worker_launch import add_arguments, resolve_args

    parser = FlexibleArgumentParser()
    add_arguments(parser)
    args = resolve_args(parser.parse_args(
        ["--model-path", str(scripted_model), "--model-names", "a,b", "--num-gpus", "2", "--port", "9"]
    ))
    assert args.model == str(scripted_model) and args.served_model_name == ["a", "b"]
    assert args.tensor_parallel_size == 2 and args.host == "127.0.0.1"
    assert args.worker_address == "http://127.0.0.1:9" and args.enable_server_load_tracking
    with pytest.raises(QwenVLLMError, match="--worker-address"):
        resolve_args(parser.parse_args(["--model-path", str(scripted_model), "--host", "0.0.0.0"]))
    with pytest.raises(QwenVLLMError, match="--model-path is required"):
        resolve_args(parser.parse_args([]))
    with pytest.raises(QwenVLLMError, match="unknown FastChat conversation template"):
        resolve_args(parser.parse_args(["--model-path", str(scripted_model), "--conv-template", "nope"]))


def test_stack_waits_for_exactly_the_names_workers_register(scripted_model, tmp_path) -> None:
    """Symlinks, ``.``, ``DIR/.``, a trailing slash and --model-names: the
    stack's expected names are the workers' own (one function decides both)."""
    import argparse
    import os

    from qwen_vllm.serving import stack

    link = tmp_path / "qwen-link"
    link.symlink_to(scripted_model)
    cases = [
        ([str(link)], [], ["qwen-link"]),
        ([str(scripted_model) + "/."], [], [scripted_model.name]),
        ([str(scripted_model) + "/"], [], [scripted_model.name]),
        ([str(link)], ["--model-names", "Qwen,qwen-7b"], ["Qwen", "qwen-7b"]),
        ([str(link)], ["--", "--model-names", "X"], ["X"]),
    ]
    cwd = os.getcwd()
    try:
        os.chdir(scripted_model)
        cases.append((["."], [], [scripted_model.name]))
        for models, extra, expected in cases:
            parser = argparse.ArgumentParser()
            stack.add_arguments(parser)
            argv = [a for m in models for a in ("--model", m)] + ["--log-dir", str(tmp_path / "logs"), *extra]
            s = stack.Stack(parser.parse_args(argv))
            try:
                s.check_worker_args()
            finally:
                s.client.close()
            assert s.model_names == sorted(expected), (models, extra)
    finally:
        os.chdir(cwd)
