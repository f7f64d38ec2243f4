"""Incremental detokenization that never splits a UTF-8 character.

Wraps `tokenizers.decoders.DecodeStream`: text is released only once its bytes form whole
characters, so a multi-byte character spread over several tokens arrives in one piece.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Turns one request's output token ids into text, a piece at a time."""

    __slots__ = ("_stream", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_ids: list[int]) -> str:
        """The new text these tokens complete ("" while a character is still incomplete)."""
        if len(token_ids) == 1:
            return self._stream.step(self._tokenizer, token_ids[0]) or ""
        pieces = [self._stream.step(self._tokenizer, t) for t in token_ids]
        return "".join(p for p in pieces if p)
