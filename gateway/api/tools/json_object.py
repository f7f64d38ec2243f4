"""One tool call written as a JSON object, `{"name": ..., "arguments": {...}}`, read a piece at
a time: the name once its string closes, the arguments value as text fragments as they arrive
(`ArgumentsText`: leading and trailing whitespace dropped, a JSON string that encodes an object
decoded), so the fragments of a streamed call join to the same text a whole-output parse gives.
"""

from __future__ import annotations

import json

from mell.gateway.api.tools.arguments import ArgumentsText


class ObjectScanner:
    """Reads one JSON object from its `{`; `feed` returns how many characters it took."""

    __slots__ = (
        "_arg_keys",
        "_args",
        "_depth",
        "_escape",
        "_in_string",
        "_key",
        "_key_raw",
        "_name_raw",
        "_out",
        "_phase",
        "done",
        "name",
        "saw_arguments",
    )

    def __init__(self, arg_keys: tuple[str, ...]) -> None:
        """`arg_keys`: the keys whose value is the call's arguments (e.g. arguments, parameters)."""
        self._arg_keys = arg_keys
        self._depth = 0
        self._in_string = self._escape = False
        self._phase = "key"  # at depth 1: key, colon (after a key), value
        self._key: str | None = None
        self._key_raw: list[str] = []
        self._name_raw: list[str] = []
        self._args = ArgumentsText()
        self._out: list[str] = []  # arguments text of the current feed
        self.name: str | None = None
        self.saw_arguments = False
        self.done = False

    def feed(self, text: str) -> tuple[int, str]:
        """(characters consumed, new arguments text); consumes up to the object's `}`."""
        out = self._out
        out.clear()
        for i, c in enumerate(text):
            if self._in_string:
                self._take(c, out)
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    self._string_closed()
            elif c == '"':
                self._in_string = True
                self._take(c, out)
            elif c in "{[":
                self._depth += 1
                if self._depth > 1:
                    self._take(c, out)
            elif c in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._value_end()
                    self.done = True
                    return i + 1, "".join(out)
                self._take(c, out)
            elif c == "," and self._depth == 1:
                self._value_end()
            elif c == ":" and self._depth == 1 and self._phase == "colon":
                self._phase = "value"
            else:
                self._take(c, out)
        return len(text), "".join(out)

    def _take(self, c: str, out: list[str]) -> None:
        if self._depth == 1 and self._phase == "key" and (self._in_string or c == '"'):
            self._key_raw.append(c)
        if self._phase != "value":
            return
        if self._key == "name":
            self._name_raw.append(c)
        elif self._key in self._arg_keys:
            self.saw_arguments = True
            out.append(self._args.add(c, self._in_string))

    def _string_closed(self) -> None:
        if self._depth != 1:
            return
        if self._phase == "key":
            self._key = _loads("".join(self._key_raw))
            self._key_raw.clear()
            self._phase = "colon"
        elif self._phase == "value" and self._key == "name":
            self._value_end()

    def cut(self) -> str:
        """The output ended inside this object: the arguments text held back, if any."""
        return self._args.end()

    def _value_end(self) -> None:
        if self._key in self._arg_keys:
            self._out.append(self._args.end())
        if self._key == "name" and self.name is None and self._name_raw:
            value = _loads("".join(self._name_raw))
            self.name = value if isinstance(value, str) and value else None
        self._key, self._phase = None, "key"


def _loads(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
