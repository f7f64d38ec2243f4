"""The interface of a tool call parser, and the driver every model format shares.

A parser reads a chat completion's output text as it streams and says which part is content
and which are tool calls: `feed(text)` and, at the end, `flush()` each return the content safe
to emit now and the `ToolCallDelta`s of the calls (a call's first delta carries its id and
name, the next ones fragments of its arguments, as OpenAI streams `delta.tool_calls`). A whole
response is the same deltas joined, so streamed and non-streamed calls agree.

`CallParser` is the shared driver: content until the format's start of calls (`calls_start`,
written by each format), then every top-level JSON object is one call and the text between
objects (markers, separators, brackets) is dropped. Text after the first call is not content.
When the output opens a call region that never yields a call, the region is returned as content
at the end.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from mell.gateway.api.tools.json_object import ObjectScanner


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of tool call `index`: its id and name (first piece) or arguments text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Start:
    """Where a format's calls begin in the output so far: `at` (None: not yet, or never), `safe`
    (how much of the text is content for sure), `never` (this output has no calls at all)."""

    at: int | None
    safe: int
    never: bool = False


class ToolParser(ABC):
    """Reads one output's text; says what is content and what are tool call deltas."""

    skip_special_tokens: ClassVar[bool] = True  # False: the format's marker is a special token

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool call deltas) of new output text."""

    @abstractmethod
    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: what was held back."""

    @property
    @abstractmethod
    def called(self) -> bool:
        """Whether the output made at least one tool call."""


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class CallParser(ToolParser):
    """Content, then a region of JSON-object calls (the driver of the model formats)."""

    arg_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(self, max_calls: int | None = None) -> None:
        """`max_calls`: 1 when parallel tool calls are off; later calls are dropped."""
        self._max_calls = max_calls
        self._buffer = ""
        self._state = "content"  # content, never (all content), calls
        self._region: list[str] = []  # raw text of the call region (content if no call)
        self._scanner: ObjectScanner | None = None
        self._pending = ""  # arguments read before the call's name
        self._count = 0  # calls started
        self._index: int | None = None  # index of the call being read, once started

    @abstractmethod
    def calls_start(self, text: str) -> Start:
        """Where the calls begin in `text` (all the output so far that is not yet content)."""

    def new_id(self) -> str:
        return call_id()

    @property
    def called(self) -> bool:
        return self._count > 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._state == "never":
            return text, []
        if self._state == "calls":
            self._region.append(text)
            return "", self._read_calls(text)
        self._buffer += text
        start = self.calls_start(self._buffer)
        if start.never:
            self._state = "never"
            content, self._buffer = self._buffer, ""
            return content, []
        if start.at is None:
            content, self._buffer = self._buffer[: start.safe], self._buffer[start.safe :]
            return content, []
        content, rest = self._buffer[: start.at], self._buffer[start.at :]
        self._buffer, self._state = "", "calls"
        self._region.append(rest)
        return content, self._read_calls(rest)

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        if self._state != "calls":
            content, self._buffer = self._buffer, ""
            return content, []
        if not self.called:  # a region that never became a call is content after all
            return "".join(self._region), []
        return "", self._cut()

    def _cut(self) -> list[ToolCallDelta]:
        """The output ended inside a call: its arguments text held back, if any."""
        held = self._held()
        return [ToolCallDelta(self._index, held)] if held and self._index is not None else []

    def _held(self) -> str:
        """The arguments text the call being read holds back (the output ended in it)."""
        return self._scanner.cut() if self._scanner is not None else ""

    def _read_calls(self, text: str) -> list[ToolCallDelta]:
        """Deltas of the call region's next text (the region starts at the format's marker)."""
        deltas: list[ToolCallDelta] = []
        while text:
            if self._scanner is None:
                at = text.find("{")
                if at < 0:
                    return deltas
                self._scanner, text = ObjectScanner(self.arg_keys), text[at:]
            used, arguments = self._scanner.feed(text)
            text = text[used:]
            deltas.extend(self._call_text(self._scanner, arguments))
            if self._scanner.done:
                self._scanner, self._pending, self._index = None, "", None
        return deltas

    def _call_text(self, scanner: ObjectScanner, arguments: str) -> list[ToolCallDelta]:
        """Deltas of the call being read: its start once its name is known, then arguments."""
        if scanner.name is None:
            self._pending += arguments
            return []
        out: list[ToolCallDelta] = []
        index = self._index
        if index is None:
            start = self._open_call(scanner.name)
            if start is None:
                return []
            out.append(start)
            index, arguments, self._pending = start.index, self._pending + arguments, ""
        if scanner.done and not scanner.saw_arguments:
            arguments += "{}"
        if arguments:
            out.append(ToolCallDelta(index, arguments))
        return out

    def _open_call(self, name: str, given_id: str | None = None) -> ToolCallDelta | None:
        """The first delta of a new call, now the one being read (None: a call past the limit,
        dropped). `given_id`: the id the model wrote, if any."""
        if self._max_calls is not None and self._count >= self._max_calls:
            return None
        index = self._index = self._count
        self._count += 1
        return ToolCallDelta(index, "", given_id or self.new_id(), name)
