"""A tool call's arguments value as it streams, a character at a time.

OpenAI's `function.arguments` is the JSON text of an object. A model writes its arguments as
that object (passed on as written, the whitespace around it dropped) or, sometimes, as a JSON
string that encodes it (`"arguments": "{\\"city\\": \\"Paris\\"}"`): such a string is held until
it ends, then becomes the text it encodes when that is JSON of an object, or stays as written.
Either way a streamed call's fragments join to the text a whole-output parse gives.
"""

from __future__ import annotations

import json


class ArgumentsText:
    """The text to emit for one arguments value, given its characters in order."""

    __slots__ = ("_quoted", "_started", "_ws")

    def __init__(self) -> None:
        self._quoted: list[str] | None = None  # a JSON string value, held until its end
        self._started = False  # a character of the value was taken
        self._ws = ""  # whitespace after the last emitted character, held back

    def add(self, c: str, in_string: bool) -> str:
        """Text to emit now for the next character `c` (`in_string`: inside, opening or closing
        a JSON string)."""
        if self._quoted is not None:
            self._quoted.append(c)
            return ""
        if c.isspace() and not in_string:
            if self._started:
                self._ws += c
            return ""
        if not self._started and c == '"':
            self._quoted, self._started = [c], True
            return ""
        out, self._ws, self._started = self._ws + c, "", True
        return out

    def end(self) -> str:
        """At the value's end (or the output's): the held string's text, if any."""
        if self._quoted is None:
            return ""
        raw, self._quoted = "".join(self._quoted).strip(), None
        return object_text(raw)


def object_text(raw: str) -> str:
    """`raw` (a JSON string literal as written): the text it encodes when that is JSON of an
    object, else `raw` itself."""
    try:
        inner = json.loads(raw)
        if isinstance(inner, str) and isinstance(json.loads(inner), dict):
            return inner.strip()
    except (ValueError, RecursionError):
        pass
    return raw


class ValueScanner:
    """Reads one bare JSON value, a call's arguments (as after Mistral's `[ARGS]`), from its
    first character: `feed` returns how many characters it took and the arguments text to emit;
    `done` once the value ended (an object's or array's closing bracket, a string's closing
    quote, or the end of a literal such as `null`)."""

    __slots__ = ("_args", "_depth", "_escape", "_in_string", "_started", "done")

    def __init__(self) -> None:
        self._args = ArgumentsText()
        self._depth = 0
        self._in_string = self._escape = False
        self._started = False
        self.done = False

    def feed(self, text: str) -> tuple[int, str]:
        out: list[str] = []
        for i, c in enumerate(text):
            if self._in_string:
                closes = not self._escape and c == '"'
                self._escape = not self._escape and c == "\\"
                out.append(self._args.add(c, True))
                self._in_string = not closes
                if closes and self._depth == 0:
                    return self._end(i + 1, out)
                continue
            if self._started and self._depth == 0 and (c.isspace() or c in "[{<,"):
                return self._end(i, out)  # a literal ended
            self._started = self._started or not c.isspace()
            self._in_string = c == '"'
            self._depth += (c in "{[") - (c in "}]")
            out.append(self._args.add(c, self._in_string))
            if c in "}]" and self._depth <= 0:
                return self._end(i + 1, out)
        return len(text), "".join(out)

    def cut(self) -> str:
        """The output ended inside the value: the text held back, if any."""
        return self._args.end()

    def _end(self, used: int, out: list[str]) -> tuple[int, str]:
        self.done = True
        out.append(self._args.end())
        return used, "".join(out)
