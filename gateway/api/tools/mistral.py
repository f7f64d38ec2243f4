"""Mistral, in either of its tool call formats, after any content (as mistral-common decodes
them, and vLLM's `mistral` parser):

- before tokenizer v11 (Mistral 7B v0.3, Mixtral 8x22B): one `[TOOL_CALLS]` then a JSON array,
  `[{"name": ..., "arguments": {...}}, ...]`, read by the shared JSON-object driver;
- v11 and later (Mistral Small 3.1+, Magistral, Devstral): one `[TOOL_CALLS]name[ARGS]{...}` per
  call, in a row; some write the call's id as well, `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`.

vLLM picks the format by the tokenizer's version (whether `[ARGS]` is in its vocabulary); here
the text after the first `[TOOL_CALLS]` tells it: a JSON array or object is the old format, a
name the new one. A decoder that drops `[ARGS]` leaves `name{...}`, so a name also ends at `{`.
The markers are control tokens, so the output is decoded with special tokens kept. Call ids are
9 letters and digits, as Mistral's chat templates require; an id the model wrote is kept when it
is one.
"""

from __future__ import annotations

import secrets
import string
from typing import ClassVar

from mell.gateway.api.reasoning import partial_marker
from mell.gateway.api.tools.arguments import ValueScanner
from mell.gateway.api.tools.parser import CallParser, Start, ToolCallDelta

OPEN = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_ALPHABET = string.ascii_letters + string.digits


class MistralParser(CallParser):
    skip_special_tokens: ClassVar[bool] = False

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._named: bool | None = None  # the v11+ format (None: not told yet)
        self._text = ""  # v11+: text not yet used (a marker, a call's name and id)
        self._value: ValueScanner | None = None  # v11+: the arguments being read

    def calls_start(self, text: str) -> Start:
        at = text.find(OPEN)
        if at >= 0:
            return Start(at, at)
        return Start(None, len(text) - partial_marker(text, OPEN))

    def new_id(self) -> str:
        return "".join(secrets.choice(_ALPHABET) for _ in range(9))

    def _read_calls(self, text: str) -> list[ToolCallDelta]:
        if self._named is None:
            self._text += text
            after = self._text[len(OPEN) :].lstrip()
            if not after:
                return []
            self._named = after[0] not in "[{"
            text, self._text = self._text, ""
        return self._read_named(text) if self._named else super()._read_calls(text)

    def _held(self) -> str:
        if not self._named:
            return super()._held()
        return self._value.cut() if self._value is not None else ""

    def _read_named(self, text: str) -> list[ToolCallDelta]:
        """Deltas of v11+ calls: each a head (`[TOOL_CALLS]name`, maybe `[CALL_ID]id`), then
        `[ARGS]` and the arguments value. Text between calls is dropped."""
        self._text += text
        deltas: list[ToolCallDelta] = []
        while True:
            if self._value is None:
                if not self._next_head(deltas):
                    return deltas
                self._value = ValueScanner()
            used, arguments = self._value.feed(self._text)
            self._text = self._text[used:]
            if arguments and self._index is not None:
                deltas.append(ToolCallDelta(self._index, arguments))
            if not self._value.done:
                return deltas
            self._value, self._index = None, None

    def _next_head(self, deltas: list[ToolCallDelta]) -> bool:
        """Reads the next call's head up to its arguments (False: not all here yet) and opens
        the call (a call without a name, or past the limit, is read and dropped)."""
        while True:
            at = self._text.find(OPEN)
            if at < 0:
                self._text = self._text[len(self._text) - partial_marker(self._text, OPEN) :]
                return False
            begin = at + len(OPEN)
            end, after = _arguments_start(self._text, begin)
            following = self._text.find(OPEN, begin)
            if 0 <= following < (end if end >= 0 else len(self._text)):
                self._text = self._text[following:]  # a head without arguments: dropped
                continue
            if end < 0:
                self._text = self._text[at:]
                return False
            head, self._text = self._text[begin:end], self._text[after:]
            name, _, given = (part.strip() for part in head.partition(CALL_ID))
            start = self._open_call(name, given if _valid_id(given) else None) if name else None
            if start is not None:
                deltas.append(start)
            return True


def _arguments_start(text: str, begin: int) -> tuple[int, int]:
    """(where a head that starts at `begin` ends, where its arguments start): at `[ARGS]`, or at
    the first `{` when no `[ARGS]` comes before it; (-1, -1) when neither is here yet."""
    marker, brace = text.find(ARGS, begin), text.find("{", begin)
    if marker >= 0 and (brace < 0 or marker < brace):
        return marker, marker + len(ARGS)
    return brace, brace


def _valid_id(given: str) -> bool:
    return len(given) == 9 and given.isascii() and given.isalnum()
