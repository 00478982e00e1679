"""Generation settings: the one table (type, range, OpenAI field) and the one
path from settings to vLLM's ``SamplingParams``.

The table serves the wrapper's keyword arguments, the FastChat worker's gen
params, the CLI's ``:conf`` and the web UI, so they accept and refuse the
same values. Qwen's generation_config.json supplies the defaults (top_p 0.8,
top_k 0, repetition_penalty 1.1, max_new_tokens 512, do_sample true); a call's
``generation_config`` and keyword arguments override them, in that order
(:func:`merge_generation`). Names are the transformers/Qwen ``generation_config`` names
(``max_new_tokens``...), which ``vLLMWrapper`` takes as keyword arguments.
Text is parsed with ``int``/``float`` and a fixed word list — never ``eval``
(Qwen's cli_demo evaluated ``:conf`` values).

This module imports nothing heavy at import time: the CLI's ``--api`` mode and
the web UI never load vLLM.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qwen_vllm.errors import QwenRequestError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Setting:
    """One generation setting: type, closed/open range, and its OpenAI field."""

    name: str
    kind: type  # int, float or bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed (e.g. top_p > 0)
    openai: str = ""  # field of a chat.completions request
    vllm_extra: bool = False  # not an OpenAI field: sent in extra_body (vLLM's sampling extensions)
    help: str = ""
    ui: bool = True  # offered by the CLI's :conf and the web UI

    def describe(self) -> str:
        """'float in (0, 1]' — used in error messages and ``:conf`` listings."""
        if self.kind is bool:
            return "true or false"
        lo = "-inf" if self.low is None else _num(self.low)
        hi = "inf" if self.high is None else _num(self.high)
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high is None else "]"
        return f"{self.kind.__name__} in {left}{lo}, {hi}{right}"

    def check(self, value: Any) -> int | float | bool:
        """Validate a typed value (e.g. from a web form); raises QwenRequestError."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise QwenRequestError(f"{self.name} must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QwenRequestError(f"{self.name} must be a number ({self.describe()}), got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise QwenRequestError(f"{self.name} must be an integer ({self.describe()}), got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise QwenRequestError(f"{self.name} must be finite ({self.describe()}), got {value!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise QwenRequestError(f"{self.name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str) -> int | float | bool:
        """Validate text typed by a person (``:conf top_p=0.9``)."""
        word = text.strip().lower()
        if self.kind is bool:
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise QwenRequestError(f"{self.name} must be true or false, got {text!r}")
        try:
            value = int(word) if self.kind is int else float(word)
        except ValueError:
            raise QwenRequestError(f"{self.name} must be {self.describe()}, got {text!r}") from None
        return self.check(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("max_new_tokens", int, 1, None, openai="max_tokens", help="longest reply, in tokens"),
        Setting("temperature", float, 0, 2, openai="temperature", help="0 = greedy"),
        Setting("top_p", float, 0, 1, low_open=True, openai="top_p", help="nucleus sampling mass"),
        Setting("top_k", int, 0, None, openai="top_k", vllm_extra=True, help="0 = off"),
        Setting(
            "repetition_penalty",
            float,
            0,
            2,
            low_open=True,
            openai="repetition_penalty",
            vllm_extra=True,
            help="1 = off",
        ),
        Setting("presence_penalty", float, -2, 2, openai="presence_penalty", help="0 = off"),
        Setting("frequency_penalty", float, -2, 2, openai="frequency_penalty", help="0 = off"),
        Setting(
            "min_new_tokens", int, 0, None, openai="min_tokens", vllm_extra=True, help="stop words ignored until then"
        ),
        Setting("do_sample", bool, openai="", help="false = greedy (temperature 0)"),
        Setting("seed", int, 0, 2**63 - 1, openai="seed", help="fixed seed: reproducible replies"),
        Setting("min_p", float, 0, 1, openai="min_p", vllm_extra=True, ui=False, help="0 = off"),
        Setting("max_window_size", int, 1, None, ui=False, help="history is dropped to fit (Qwen's chat())"),
    )
}
UI_SETTINGS = {name: s for name, s in SETTINGS.items() if s.ui}


def get_setting(name: str) -> Setting:
    """The Setting called ``name``; the error lists close matches."""
    try:
        return SETTINGS[name]
    except KeyError:
        close = difflib.get_close_matches(name, SETTINGS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise QwenRequestError(f"unknown setting {name!r}{hint}; known: {', '.join(SETTINGS)}") from None


def parse_assignments(items: list[str]) -> dict[str, int | float | bool]:
    """``["top_p=0.9", "top_k=5"]`` -> validated dict; all or nothing."""
    if not items:
        raise QwenRequestError("expected key=value, e.g. :conf temperature=0.7")
    parsed: dict[str, int | float | bool] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise QwenRequestError(f"expected key=value, got {item!r}")
        setting = get_setting(key.strip())
        if not setting.ui:
            raise QwenRequestError(f"{setting.name} is not a chat setting; chat settings: {', '.join(UI_SETTINGS)}")
        parsed[setting.name] = setting.parse(text)
    return parsed


def check_settings(settings: Mapping[str, Any]) -> dict[str, int | float | bool]:
    """Validate typed settings; ``None`` values mean "server default" and are dropped."""
    return {name: get_setting(name).check(v) for name, v in settings.items() if v is not None}


def openai_params(settings: Mapping[str, Any]) -> dict[str, Any]:
    """chat.completions keyword arguments for validated settings.

    vLLM's own sampling fields (top_k, repetition_penalty, min_tokens) go in
    ``extra_body``; ``do_sample=false`` becomes temperature 0, as in
    transformers.
    """
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in check_settings(settings).items():
        setting = SETTINGS[name]
        if name == "do_sample":
            continue
        (extra if setting.vllm_extra else kwargs)[setting.openai] = value
    if settings.get("do_sample") is False:
        kwargs["temperature"] = 0.0
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def number(key: str, value: Any) -> int | float | bool:
    """``value`` checked against ``key``'s row of the table (QwenRequestError)."""
    return get_setting(key).check(value)


def merge_generation(
    defaults: Mapping[str, Any],
    generation_config: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """defaults < generation_config (dict or transformers GenerationConfig) <
    overrides, every value checked against the table. An unknown keyword in
    ``overrides`` is a TypeError (a typo must not pass silently)."""
    merged = {k: v for k, v in defaults.items() if k in SETTINGS}
    if generation_config is not None:
        if isinstance(generation_config, Mapping):
            gc = generation_config
        elif callable(getattr(generation_config, "to_dict", None)):
            gc = generation_config.to_dict()
        else:
            raise QwenRequestError(
                f"generation_config must be a dict or a transformers GenerationConfig, got {type(generation_config).__name__}"
            )
        merged.update({k: v for k, v in gc.items() if k in SETTINGS and v is not None})
    for key, value in (overrides or {}).items():
        if key not in SETTINGS:
            raise TypeError(f"unknown generation argument {key!r}; supported: {', '.join(SETTINGS)} and stop_words_ids")
        merged[key] = value
    return {key: None if value is None else number(key, value) for key, value in merged.items()}


def to_sampling_params(gen: Mapping[str, Any], *, stop_token_ids: list[int], stop: list[str], n: int = 1, **extra: Any):
    """vLLM ``SamplingParams`` for merged settings; invalid combinations raise
    QwenRequestError naming the setting."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    do_sample = gen.get("do_sample", True)
    kwargs = dict(
        n=n,
        temperature=gen.get("temperature", 1.0) if do_sample else 0.0,
        top_p=gen.get("top_p", 1.0) if do_sample else 1.0,
        top_k=gen.get("top_k", 0) if do_sample else 0,
        min_p=gen.get("min_p", 0.0) if do_sample else 0.0,
        repetition_penalty=gen.get("repetition_penalty", 1.0),
        presence_penalty=gen.get("presence_penalty", 0.0),
        frequency_penalty=gen.get("frequency_penalty", 0.0),
        max_tokens=gen.get("max_new_tokens", 512),
        min_tokens=gen.get("min_new_tokens", 0),
        seed=gen.get("seed"),
        stop_token_ids=stop_token_ids,
        stop=stop,
        skip_special_tokens=True,
        **extra,
    )
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise QwenRequestError(f"invalid generation settings: {exc}") from exc
