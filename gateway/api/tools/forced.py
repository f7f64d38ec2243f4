"""Calls the grammar forced (tool_choice `required` or named), as vLLM forces them: the output
is a JSON array `[{"name": ..., "parameters": {...}}, ...]` (required) or the arguments object
of the one named function (named), whatever the model's own format."""

from __future__ import annotations

from mell.gateway.api.tools.parser import CallParser, Start, ToolCallDelta, ToolParser, call_id


class RequiredParser(CallParser):
    """`required`: the whole output is the array of calls."""

    def calls_start(self, text: str) -> Start:
        return Start(0, 0)


class NamedParser(ToolParser):
    """A named function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False
        self._in_arguments = False  # leading whitespace is dropped

    @property
    def called(self) -> bool:
        return True

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out: list[ToolCallDelta] = []
        if not self._started:
            self._started = True
            out.append(ToolCallDelta(0, "", call_id(), self._name))
        if not self._in_arguments:
            text = text.lstrip()
            self._in_arguments = bool(text)
        if text:
            out.append(ToolCallDelta(0, text))
        return "", out

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        return "", [] if self._started else [ToolCallDelta(0, "", call_id(), self._name)]
