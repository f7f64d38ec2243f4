"""Incremental detokenization that never splits a UTF-8 character.

Wraps `tokenizers.decoders.DecodeStream`: text is released only once its bytes form whole
characters, so a multi-byte character spread over several tokens arrives in one piece. At the
end (`flush`), bytes still incomplete are released as the tokenizer's own decode renders them
(U+FFFD), so the whole text equals `tokenizer.decode(ids)`.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Turns one request's output token ids into text, a piece at a time."""

    __slots__ = ("_emitted", "_ids", "_skip", "_stream", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._emitted: list[str] = []

    def step(self, token_ids: list[int]) -> str:
        """The new text these tokens complete ("" while a character is still incomplete)."""
        self._ids.extend(token_ids)
        if len(token_ids) == 1:
            text = self._stream.step(self._tokenizer, token_ids[0]) or ""
        else:
            text = "".join(p for t in token_ids if (p := self._stream.step(self._tokenizer, t)))
        if text:
            self._emitted.append(text)
        return text

    def flush(self) -> str:
        """The text still held back at the end (incomplete bytes decode as U+FFFD)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        emitted = "".join(self._emitted)
        if not full.startswith(emitted):
            return ""
        rest = full[len(emitted) :]
        if rest:
            self._emitted.append(rest)
        return rest
