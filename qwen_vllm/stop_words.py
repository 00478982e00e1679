"""Stop handling shared by every generation path (wrapper, worker, OpenAI server).

* ChatML chats always stop on ``<|im_end|>``, ``<|im_start|>`` and
  ``<|endoftext|>`` (Qwen's get_stop_words_ids); base models on ``<|endoftext|>``.
  One mechanism does it for every path: vLLM's default stops, which
  ``plugin/chatml_eos.py`` makes all three ChatML ids on a chat checkpoint.
* Extra stop words come as strings or id lists (Qwen's ``stop_words_ids``,
  e.g. ReAct's "Observation:"). Single ids stop as tokens; longer sequences
  are decoded and matched as *text*, because the model may emit another
  tokenization of the same text (Qwen's openai_api.py added lstrip variants
  to work around exactly that).
* Stop text never appears in output. While streaming, text that could be the
  start of a stop word is held back until it is known not to be one: vLLM's
  detokenizer does that for the stop strings it is given (it holds back
  ``len(longest stop) - 1`` characters and an incomplete UTF-8 character),
  and ``StreamDelta`` turns its cumulative text into deltas without ever
  retracting a character.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from qwen_vllm.errors import QwenRequestError
from qwen_vllm.plugin.tokenizer import ENDOFTEXT_ID, IM_END_ID, IM_START_ID

if TYPE_CHECKING:
    from qwen_vllm.plugin.tokenizer import QWenTokenizer

CHATML_STOP_IDS = (IM_END_ID, IM_START_ID, ENDOFTEXT_ID)

StopWords = Iterable[str | int | Sequence[int]]


def split_stop_words(stop_words: StopWords | None, tokenizer: QWenTokenizer) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) for Qwen-style stop words.

    Accepts strings, single ids, and id lists (``[[37763, 367, 25]]`` is
    "Observation:"), mixed freely.
    """
    ids: list[int] = []
    strings: list[str] = []
    for word in stop_words or ():
        if isinstance(word, str):
            if not word:
                raise QwenRequestError("stop words must not be empty strings")
            strings.append(word)
        elif isinstance(word, int) and not isinstance(word, bool):
            ids.append(word)
        elif isinstance(word, Sequence) and word and all(isinstance(i, int) and not isinstance(i, bool) for i in word):
            if len(word) == 1:
                ids.append(word[0])
            else:
                strings.append(tokenizer.decode(list(word)))
        else:
            raise QwenRequestError(
                f"stop word {word!r}: expected a string, a token id or a non-empty list of token ids"
            )
    bad = [i for i in ids if not 0 <= i < len(tokenizer)]
    if bad:
        raise QwenRequestError(f"stop token ids {bad} are outside the vocabulary (0..{len(tokenizer) - 1})")
    return ids, strings


class StreamDelta:
    """Cumulative text -> new text since the last call; never retracts."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, cumulative: str) -> str:
        if not cumulative.startswith(self.text):
            raise RuntimeError("streamed text changed a prefix it had already shown")
        delta, self.text = cumulative[len(self.text) :], cumulative
        return delta
