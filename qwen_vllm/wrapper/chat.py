"""vLLMWrapper: the transformers ``model.chat()`` interface on vLLM's engine.

``vLLMWrapper('Qwen/Qwen-7B-Chat').chat(query, history)`` is what the Qwen
README tells users to run. Data path: query + history -> ChatML ids
(chat_template.make_context) -> engine (token ids, never a re-tokenized
string) -> stop handling (stop_words) -> (response, history).

Every request goes through one engine loop, so calls from several threads,
``batch_chat`` and interleaved ``chat_stream`` generators all share vLLM's
continuous batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from qwen_vllm.chat_template import DEFAULT_SYSTEM, History, make_context
from qwen_vllm.checkpoints.lora import LORA_DEFAULTS, serving_dir
from qwen_vllm.errors import QwenRequestError, QwenVLLMError
from qwen_vllm.plugin.checkpoint import read_generation_config
from qwen_vllm.plugin.checks import check_before_start
from qwen_vllm.runtime.cpu import engine_environment
from qwen_vllm.settings import merge_generation, to_sampling_params
from qwen_vllm.stop_words import StopWords, StreamDelta, split_stop_words


class QwenChatFormatError(QwenVLLMError):
    """chat() was called on a base model (generation_config chat_format "raw")."""


@contextlib.contextmanager
def _no_main_reimport() -> Iterator[None]:
    """Stop spawned engine processes from re-running the user's script.

    vLLM's CPU backend starts processes with ``spawn``, which re-imports
    ``__main__``: a script that builds the model at top level (as the Qwen
    README's snippets do) would build it again in every child. Hiding the main
    module's file/spec while the engine starts makes that pattern work.
    """
    main = sys.modules.get("__main__")
    if main is None or multiprocessing.parent_process() is not None:
        yield
        return
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    try:
        main.__spec__ = None
        if hasattr(main, "__file__"):
            del main.__file__
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _check_text(name: str, value: Any) -> None:
    """A str that can be encoded (no lone surrogates, which tiktoken cannot take)."""
    if not isinstance(value, str):
        raise QwenRequestError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise QwenRequestError(f"{name} is not valid UTF-8 text ({exc.reason} at index {exc.start})") from None


def _check_engine_kwargs(kwargs: Mapping[str, Any]) -> None:
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TypeError(f"vLLMWrapper got an unknown engine argument {key!r}{hint}")


class _EngineLoop:
    """Runs vLLM's LLMEngine for many concurrent requests: whoever needs
    output steps the engine and files every request's output in its queue."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.queues: dict[str, deque] = {}
        self.ids = itertools.count()

    def submit(self, prompt_ids: list[int], params: Any, lora: Any = None) -> str:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        with self.lock:
            request_id = f"qwen-{next(self.ids)}"
            try:
                # Outputs carry this (external) id; add_request returns an internal one.
                self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids), params, lora_request=lora)
            except (ValueError, VLLMClientError) as exc:  # vLLM's validation (length, ids, params)
                raise QwenRequestError(str(exc)) from exc
            self.queues[request_id] = deque()
            return request_id

    def outputs(self, request_id: str) -> Iterator[Any]:
        """Yield the request's outputs until it finishes; aborts if abandoned."""
        queue = self.queues[request_id]
        finished = False
        try:
            while not finished:
                with self.lock:
                    if not queue:
                        for out in self.engine.step():
                            if out.request_id in self.queues:
                                self.queues[out.request_id].append(out)
                    pending = list(queue)
                    queue.clear()
                for out in pending:
                    finished = out.finished
                    yield out
        finally:
            with self.lock:
                self.queues.pop(request_id, None)
                if not finished:
                    self.engine.abort_request([request_id])

    def run(self, requests: Sequence[tuple[list[int], Any, Any]]) -> list[Any]:
        """Submit all (prompt ids, params, LoRA request or None), then collect
        each final output (one continuous batch)."""
        ids = [self.submit(*r) for r in requests]
        return [list(self.outputs(rid))[-1] for rid in ids]


class vLLMWrapper:  # noqa: N801 - the name Qwen's README uses
    """Qwen chat on vLLM: ``chat``, ``chat_stream``, ``batch_chat``, ``generate``.

    With ``enable_lora=True`` (``max_lora_rank`` defaults to 64, the rank
    Qwen's finetune.py trains; ``max_loras`` to 4 adapters in one batch), every
    call takes ``adapter=``: a PEFT LoRA adapter directory (checked against
    the checkpoint, then loaded by vLLM on first use) or the name it was
    loaded under; None is the base model. ``adapters`` (name -> directory)
    enables LoRA and loads them, checked before the engine starts.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        trust_remote_code: bool = True,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.90,
        dtype: str = "auto",
        quantization: str | None = None,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        model_dir = os.fspath(model_dir)
        if adapters:
            engine_kwargs = {"enable_lora": True, **engine_kwargs}
        if engine_kwargs.get("enable_lora"):
            engine_kwargs = {**LORA_DEFAULTS, **engine_kwargs}
        _check_engine_kwargs(engine_kwargs)
        quantization = check_before_start(
            model_dir,
            quantization=quantization,
            kv_cache_dtype=engine_kwargs.get("kv_cache_dtype"),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=engine_kwargs.get("max_model_len"),
            need_weights=engine_kwargs.get("load_format") != "dummy",
        )
        self.model_dir = model_dir
        self.max_lora_rank = engine_kwargs.get("max_lora_rank") if engine_kwargs.get("enable_lora") else None
        self._adapters: dict[str, Any] = {}  # name -> vLLM LoRARequest
        self._adapter_dirs: dict[str, str] = {}  # name -> the directory it was loaded from
        for name, path in (adapters or {}).items():  # needs no engine: vLLM loads them on first use
            self.load_adapter(path, name)
        self.generation_config = read_generation_config(model_dir)
        self.chat_format = self.generation_config.get("chat_format", "chatml")
        from vllm import LLM

        with engine_environment(tensor_parallel_size), _no_main_reimport():
            self.llm = LLM(
                model=model_dir,
                tokenizer=model_dir,
                trust_remote_code=trust_remote_code,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                quantization=quantization,
                **engine_kwargs,
            )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._loop = _EngineLoop(self.llm.llm_engine)

    # -- request building ----------------------------------------------------
    def _chat_request(
        self,
        query: str,
        history: History | None,
        system: str,
        generation_config: Any,
        stop_words_ids: StopWords | None,
        gen_kwargs: Mapping[str, Any],
        adapter: str | os.PathLike | None = None,
    ) -> tuple[list[int], Any, Any]:
        if self.chat_format != "chatml":
            raise QwenChatFormatError(
                f"chat() needs a chat model; this checkpoint's chat_format is {self.chat_format!r} "
                "(a base model): use generate()"
            )
        _check_text("query", query)
        _check_text("system", system)
        history = list(history or [])
        for i, turn in enumerate(history):
            if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise QwenRequestError(f"history[{i}] must be a (query, response) pair of strings")
            for text in turn:
                _check_text(f"history[{i}]", text)
        gen = merge_generation(self.generation_config, generation_config, gen_kwargs)
        context, _ = make_context(
            self.tokenizer,
            query,
            history,
            system,
            max_window_size=gen.get("max_window_size"),
            max_model_len=self.max_model_len,
            max_new_tokens=gen.get("max_new_tokens", 512),
        )
        return context, self._params(gen, stop_words_ids), self.lora_request(adapter)

    def load_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Check a PEFT LoRA adapter directory against this checkpoint and make
        it usable as ``adapter=name`` (default: the directory's name); vLLM
        loads its weights on first use. Returns the name."""
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise QwenRequestError("adapters need vLLMWrapper(..., enable_lora=True)")
        path = os.path.abspath(os.fspath(path))
        name = name or os.path.basename(path.rstrip(os.sep))
        if name in self._adapters:
            if self._adapter_dirs[name] != path:
                raise QwenRequestError(f"adapter name {name!r} is already loaded from {self._adapter_dirs[name]}")
            return name
        served = serving_dir(self.model_dir, path, self.max_lora_rank)  # may be a checked copy of path
        self._adapters[name] = LoRARequest(name, len(self._adapters) + 1, str(served))
        self._adapter_dirs[name] = path
        return name

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters loaded so far, in load order."""
        return list(self._adapters)

    def lora_request(self, adapter: str | os.PathLike | None) -> Any:
        """vLLM's LoRARequest for ``adapter`` (a loaded name or a directory), None for the base model."""
        if adapter is None:
            return None
        key = os.fspath(adapter)
        if key in self._adapters:
            return self._adapters[key]
        for name, path in self._adapter_dirs.items():
            if path == os.path.abspath(key):
                return self._adapters[name]
        if not os.path.isdir(key):
            served = ", ".join(self._adapters) or "none"
            raise QwenRequestError(f"adapter {key!r} is neither a loaded adapter name (loaded: {served}) nor a directory")
        return self._adapters[self.load_adapter(key)]

    def _params(self, gen: Mapping[str, Any], stop_words_ids: StopWords | None) -> Any:
        """SamplingParams plus the caller's stop words. The checkpoint's own stops
        (all ChatML ids on a chat checkpoint, ``<|endoftext|>`` on a base one)
        are vLLM's default stops for every request (plugin/chatml_eos.py)."""
        from vllm.sampling_params import RequestOutputKind

        extra_ids, stop = split_stop_words(stop_words_ids, self.tokenizer)
        return to_sampling_params(
            gen,
            stop_token_ids=extra_ids,
            stop=stop,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _chat_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Accept both ``chat(query, history, ...)`` (Qwen's wrapper) and
        ``chat(tokenizer, query, history, ...)`` (transformers' model.chat)."""
        kwargs.pop("tokenizer", None)
        if args and not isinstance(args[0], str) and hasattr(args[0], "encode"):
            args = args[1:]
        if "stream" in kwargs:
            if kwargs.pop("stream"):
                raise TypeError("chat() does not stream; use chat_stream()")
        names = ("query", "history", "system")
        if len(args) > len(names):
            raise TypeError(f"chat() takes at most {len(names)} positional arguments besides the tokenizer")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"chat() got multiple values for argument {name!r}")
            kwargs[name] = value
        if "query" not in kwargs:
            raise TypeError("chat() missing required argument 'query'")
        return (), kwargs

    # -- public API ------------------------------------------------------------
    def chat(self, *args: Any, **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:
        """``chat(query, history=None, system=..., generation_config=None,
        stop_words_ids=None, **gen_kwargs) -> (response, history)``.

        Also callable as ``chat(tokenizer, query, history, ...)``. The returned
        history is a new list ending with ``(query, response)``; the caller's
        list is never changed.
        """
        _, kw = self._chat_args(args, kwargs)
        return self._chat(**kw)

    def _chat(
        self,
        query: str,
        history: History | None = None,
        system: str = DEFAULT_SYSTEM,
        generation_config: Any = None,
        stop_words_ids: StopWords | None = None,
        adapter: str | os.PathLike | None = None,
        **gen_kwargs: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        request = self._chat_request(query, history, system, generation_config, stop_words_ids, gen_kwargs, adapter)
        out = self._loop.run([request])[0]
        response = out.outputs[0].text
        return response, [*(history or []), (query, response)]

    def chat_stream(self, *args: Any, delta: bool = False, **kwargs: Any) -> Iterator[str]:
        """Stream a reply token by token, yielding the cumulative text (like
        transformers' chat_stream) or, with ``delta=True``, only the new text.

        A stop word's first characters and an incomplete UTF-8 character are
        held back until resolved, so yielded text is never retracted.
        """
        _, kw = self._chat_args(args, kwargs)
        query = kw.pop("query")
        history = kw.pop("history", None)
        system = kw.pop("system", DEFAULT_SYSTEM)
        generation_config = kw.pop("generation_config", None)
        stop_words_ids = kw.pop("stop_words_ids", None)
        adapter = kw.pop("adapter", None)
        request = self._chat_request(query, history, system, generation_config, stop_words_ids, kw, adapter)
        return self._stream(*request, delta=delta)

    def _stream(self, prompt: list[int], params: Any, lora: Any, delta: bool) -> Iterator[str]:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.CUMULATIVE
        request_id = self._loop.submit(prompt, params, lora)
        step = StreamDelta()
        for out in self._loop.outputs(request_id):
            new = step(out.outputs[0].text)
            if new:
                yield new if delta else step.text

    def chat_ids(
        self,
        prompt_ids: Sequence[int],
        generation_config: Any = None,
        stop_words_ids: StopWords | None = None,
        adapter: str | os.PathLike | None = None,
        **gen_kwargs: Any,
    ) -> str:
        """The reply to a prompt already rendered as ChatML token ids, with
        ChatML stops plus ``stop_words_ids``. For prompts ``chat()`` cannot
        express, e.g. a tool conversation continued inside an open assistant
        turn (qwen_vllm.wrapper.tools.chat_with_tools)."""
        if self.chat_format != "chatml":
            raise QwenChatFormatError(
                f"chat_ids() needs a chat model; this checkpoint's chat_format is {self.chat_format!r}"
            )
        ids = list(prompt_ids)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise QwenRequestError("prompt_ids must be a non-empty list of token ids")
        gen = merge_generation(self.generation_config, generation_config, gen_kwargs)
        out = self._loop.run([(ids, self._params(gen, stop_words_ids), self.lora_request(adapter))])[0]
        return out.outputs[0].text

    def batch_chat(
        self,
        queries: Sequence[str],
        histories: Sequence[History | None] | None = None,
        system: str = DEFAULT_SYSTEM,
        generation_config: Any = None,
        stop_words_ids: StopWords | None = None,
        adapter: str | os.PathLike | Sequence[str | os.PathLike | None] | None = None,
        **gen_kwargs: Any,
    ) -> list[tuple[str, list[tuple[str, str]]]]:
        """Many conversations in one continuous batch: ``[(response, history)]``.
        ``adapter`` is one for all, or a list with one per conversation (None:
        the base model): different adapters share the batch."""
        if isinstance(queries, str):
            raise QwenRequestError("batch_chat() takes a list of queries; use chat() for one")
        histories = list(histories) if histories is not None else [None] * len(queries)
        if len(histories) != len(queries):
            raise QwenRequestError(f"{len(queries)} queries but {len(histories)} histories")
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(queries)
        if len(adapters) != len(queries):
            raise QwenRequestError(f"{len(queries)} queries but {len(adapters)} adapters")
        requests = [
            self._chat_request(q, h, system, generation_config, stop_words_ids, gen_kwargs, a)
            for q, h, a in zip(queries, histories, adapters)
        ]
        outs = self._loop.run(requests)
        return [
            (o.outputs[0].text, [*(h or []), (q, o.outputs[0].text)]) for q, h, o in zip(queries, histories, outs)
        ]

    def generate(
        self,
        prompts: str | Sequence[str],
        generation_config: Any = None,
        stop_words_ids: StopWords | None = None,
        adapter: str | os.PathLike | None = None,
        **gen_kwargs: Any,
    ) -> str | list[str]:
        """Plain completion (base models, or raw prompts on chat models) with
        the same sampling controls; stops on the checkpoint's own stops (on a
        chat checkpoint every ChatML id, as vLLM's server does) and stop words."""
        single = isinstance(prompts, str)
        if not single and not isinstance(prompts, Sequence):
            raise QwenRequestError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        texts = [prompts] if single else list(prompts)
        gen = merge_generation(self.generation_config, generation_config, gen_kwargs)
        params = self._params(gen, stop_words_ids)
        lora = self.lora_request(adapter)
        requests = []
        for text in texts:
            if not isinstance(text, str):
                raise QwenRequestError(f"prompts must be strings, got {type(text).__name__}")
            _check_text("prompt", text)
            requests.append((self.tokenizer.encode_text(text), params, lora))
        outs = [o.outputs[0].text for o in self._loop.run(requests)]
        return outs[0] if single else outs
