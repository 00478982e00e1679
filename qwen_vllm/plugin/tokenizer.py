"""QWenTokenizer: Qwen v1's tiktoken BPE as a transformers tokenizer, without remote code.

Qwen checkpoints name ``tokenizer_class: "QWenTokenizer"`` and ship ``qwen.tiktoken``.
This class answers to that name (registered with transformers by name, so it
wins over the checkpoint's ``tokenization_qwen.py`` even with
``trust_remote_code=True``) and reproduces Qwen's ids exactly: NFC
normalisation, Qwen's pre-tokenizer regex, 208 special tokens from 151643.

Like Qwen's own class, regular tokens are ``bytes`` (one id can be part of a
UTF-8 character); vLLM's incremental detokenizer then holds back a partial
character until it is complete.
"""

from __future__ import annotations

import base64
import functools
import os
import unicodedata
from collections.abc import Collection, Iterable
from typing import Any

import tiktoken
from transformers import PythonBackend
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

from qwen_vllm.chat_template import RenderedChat
from qwen_vllm.errors import QwenCheckpointError
from qwen_vllm.plugin.checkpoint import VOCAB_FILE, read_generation_config

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = 151643
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *EXTRAS)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
NUM_REGULAR_TOKENS = SPECIAL_START_ID  # ranks 0..151642 in qwen.tiktoken


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read ``qwen.tiktoken`` (lines of ``base64(bytes) rank``)."""
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


@functools.lru_cache(maxsize=8)
def load_encoding(path: str) -> tiktoken.Encoding:
    """The tiktoken Encoding for a ``qwen.tiktoken`` file (cached per path)."""
    if not os.path.isfile(path):
        raise QwenCheckpointError(f"{path}: missing; a Qwen checkpoint needs {VOCAB_FILE}")
    try:
        ranks = load_ranks(path)
    except Exception as exc:  # malformed base64 / rank lines
        raise QwenCheckpointError(f"{path}: not a valid {VOCAB_FILE} file ({exc})") from exc
    if len(ranks) != NUM_REGULAR_TOKENS:
        raise QwenCheckpointError(
            f"{path}: {len(ranks)} ranks, expected {NUM_REGULAR_TOKENS} for Qwen v1"
        )
    specials = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


class QWenTokenizer(PythonBackend):
    """Qwen v1 tokenizer over tiktoken, with the transformers API vLLM expects."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs: Any) -> None:
        self.tokenizer = load_encoding(os.path.abspath(vocab_file))
        self.vocab_file = vocab_file
        self.errors = errors
        self.special_tokens = {t: SPECIAL_START_ID + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self._id_to_bytes = {i: b for b, i in self.tokenizer._mergeable_ranks.items()}
        self.eod_id = ENDOFTEXT_ID
        self.im_start_id = IM_START_ID
        self.im_end_id = IM_END_ID
        # <|im_end|> ends every chat turn, so it is a chat checkpoint's primary EOS; a
        # base checkpoint's text ends at <|endoftext|> only, as in Qwen's generate().
        # <|endoftext|> (generation_config's eos) is the pad token, as Qwen's FAQ advises.
        checkpoint = os.path.dirname(os.path.abspath(vocab_file))
        raw = read_generation_config(checkpoint).get("chat_format") == "raw"
        kwargs.setdefault("eos_token", ENDOFTEXT if raw else IM_END)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        for unused in ("bos_token", "unk_token"):
            kwargs.pop(unused, None)
        kwargs.pop("extra_special_tokens", None)
        super().__init__(errors=errors, **kwargs)
        if self.chat_template is None:
            from qwen_vllm.chat_template import CHATML_JINJA

            self.chat_template = CHATML_JINJA

    # -- vocabulary ---------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return NUM_REGULAR_TOKENS + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[bytes | str, int]:
        vocab: dict[bytes | str, int] = dict(self.tokenizer._mergeable_ranks)
        vocab.update(self.special_tokens)
        return vocab

    def get_added_vocab(self) -> dict[str, int]:
        # Specials are part of the base vocabulary; nothing is ever added.
        return {}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    @property
    def all_special_ids(self) -> list[int]:
        return list(range(SPECIAL_START_ID, SPECIAL_START_ID + len(SPECIAL_TOKENS)))

    def _add_tokens(self, new_tokens: Iterable[Any], special_tokens: bool = False) -> int:
        for token in new_tokens:
            if str(token) not in self.special_tokens:
                raise ValueError(f"QWenTokenizer cannot add token {token!r}: the vocabulary is fixed")
        return 0

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if isinstance(token, str):
            token = token.encode("utf-8")
        try:
            return self.tokenizer._mergeable_ranks[token]
        except KeyError:
            raise ValueError(f"unknown Qwen token {token!r}") from None

    def _convert_token_to_id_with_added_voc(self, token: bytes | str) -> int:
        return self._convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index in self._id_to_special:
            return self._id_to_special[index]
        try:
            return self._id_to_bytes[index]
        except KeyError:
            raise ValueError(f"token id {index} is outside Qwen's vocabulary") from None

    def convert_ids_to_tokens(
        self, ids: int | list[int], skip_special_tokens: bool = False
    ) -> bytes | str | list[bytes | str]:
        if isinstance(ids, int):
            return self._convert_id_to_token(ids)
        out: list[bytes | str] = []
        for index in ids:
            index = int(index)
            if skip_special_tokens and index >= SPECIAL_START_ID:
                continue
            piece = self._id_to_bytes.get(index)
            out.append(piece if piece is not None else self._id_to_special.get(index, b""))
        return out

    def convert_tokens_to_string(self, tokens: list[bytes | str]) -> str:
        data = b"".join(t if isinstance(t, bytes) else t.encode("utf-8") for t in tokens)
        return data.decode("utf-8", errors=self.errors)

    # -- encoding -------------------------------------------------------------
    def encode_text(
        self,
        text: str,
        allowed_special: Collection[str] | str = "all",
        disallowed_special: Collection[str] | str = (),
    ) -> list[int]:
        """Qwen's encode: NFC, then tiktoken.

        ``allowed_special="all"`` (Qwen's default) parses special-token text as
        control tokens; pass ``allowed_special=set()`` for untrusted text so
        ``<|im_start|>`` stays plain text. A prompt our chat template rendered
        (chat_template.RenderedChat) keeps the ids it was rendered with.
        """
        if isinstance(text, RenderedChat):
            return list(text.token_ids)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self.tokenizer.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def tokenize(self, text: str, **kwargs: Any) -> list[bytes | str]:
        kwargs.pop("add_special_tokens", None)
        return [self._convert_id_to_token(i) for i in self.encode_text(text, **kwargs)]

    def encode(self, text: Any, text_pair: Any = None, **kwargs: Any) -> list[int]:
        """Plain ``encode(str)`` is tiktoken alone; anything else (pairs,
        truncation, padding, tensors) takes transformers' path."""
        plain = {"add_special_tokens", "allowed_special", "disallowed_special"}
        if isinstance(text, str) and text_pair is None and set(kwargs) <= plain:
            kwargs.pop("add_special_tokens", None)  # Qwen adds none
            return self.encode_text(text, **kwargs)
        return super().encode(text, text_pair=text_pair, **kwargs)

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
        """Strings go straight to tiktoken (no per-token Python work); batches
        and pre-tokenized input take transformers' path, which calls back here
        for each string."""
        special = {k: kwargs.pop(k) for k in ("allowed_special", "disallowed_special") if k in kwargs}
        if not isinstance(text, str) or not (text_pair is None or isinstance(text_pair, str)):
            return super()._encode_plus(text, text_pair=text_pair, **kwargs)
        return self.prepare_for_model(
            self.encode_text(text, **special),
            pair_ids=None if text_pair is None else self.encode_text(text_pair, **special),
            add_special_tokens=kwargs.get("add_special_tokens", True),
            padding=kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD).value,
            truncation=kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE).value,
            max_length=kwargs.get("max_length"),
            stride=kwargs.get("stride", 0),
            pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
            padding_side=kwargs.get("padding_side"),
            return_tensors=kwargs.get("return_tensors"),
            prepend_batch_axis=True,
            return_attention_mask=kwargs.get("return_attention_mask"),
            return_token_type_ids=kwargs.get("return_token_type_ids"),
            return_overflowing_tokens=kwargs.get("return_overflowing_tokens", False),
            return_special_tokens_mask=kwargs.get("return_special_tokens_mask", False),
            return_length=kwargs.get("return_length", False),
            verbose=kwargs.get("verbose", True),
        )

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # Qwen adds no BOS/EOS around a sequence.
        return token_ids_0 + (token_ids_1 or [])

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 0

    # -- decoding -------------------------------------------------------------
    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        limit = SPECIAL_START_ID if skip_special_tokens else self.vocab_size
        # Ids past the real vocabulary (config pads to 151936) decode to nothing.
        token_ids = [int(i) for i in token_ids if 0 <= int(i) < limit]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    # -- chat -------------------------------------------------------------------
    def apply_chat_template(self, conversation: Any, tools: Any = None, **kwargs: Any) -> Any:
        """Render Qwen's ChatML natively (segment by segment, message text never
        parsed as control tokens) unless a different Jinja template is asked for."""
        from qwen_vllm import chat_template

        template = kwargs.get("chat_template")
        if template not in (None, chat_template.CHATML_JINJA) or (
            conversation and isinstance(conversation[0], (list, tuple))
        ):
            return super().apply_chat_template(conversation, tools=tools, **kwargs)
        return chat_template.apply_chat_template(self, conversation, tools=tools, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix or "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            for token, rank in sorted(self.tokenizer._mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        return (path,)
