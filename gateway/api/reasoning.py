"""Reasoning output split from the answer, as vLLM's reasoning parsers do it.

A model whose chat template knows `</think>` thinks before it answers. Two styles:
- `deepseek_r1`: the template opens `<think>` in the generation prompt, so the output starts
  inside the reasoning; everything before `</think>` is reasoning (all of it when the output
  never closes it).
- `qwen3`: the output opens `<think>` itself; without it (thinking disabled) all is content.
The text is split as it streams: a possible start of a marker is held back until it is decided.
"""

from __future__ import annotations

from typing import Literal

from mell.common.errors import InvalidRequest
from mell.gateway.api.chat_template import ChatTemplate

Style = Literal["deepseek_r1", "qwen3"]
OPEN, CLOSE = "<think>", "</think>"


def reasoning_style(template: ChatTemplate | None) -> Style | None:
    """The model's reasoning style, read from its chat template (None: not a thinking model)."""
    if template is None or CLOSE not in template.source:
        return None
    try:
        prompt = template.render([{"role": "user", "content": "x"}], add_generation_prompt=True)
    except InvalidRequest:  # a template that needs more than this to render is not probed
        return "qwen3"
    return "deepseek_r1" if prompt.rstrip().endswith(OPEN) else "qwen3"


class ReasoningSplitter:
    """Feeds output text through; says which part is reasoning and which is content."""

    __slots__ = ("_after_start", "_held", "_keep", "_state")

    def __init__(self, style: Style, keep: bool = True) -> None:
        """`keep` False (vLLM's include_reasoning=false): the reasoning is dropped."""
        self._keep = keep
        # "start": may still open with <think>; "think": inside; "content": after or none
        self._state = "start"
        self._after_start = "think" if style == "deepseek_r1" else "content"  # without <think>
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) safe to emit now."""
        reasoning, content = self._feed(text)
        return (reasoning if self._keep else ""), content

    def _feed(self, text: str) -> tuple[str, str]:
        buffer = self._held + text
        self._held = ""
        reasoning = content = ""
        while buffer:
            if self._state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(OPEN):
                    self._state, buffer = "think", stripped[len(OPEN) :]
                elif OPEN.startswith(stripped):
                    self._held = buffer  # could still become <think>
                    return reasoning, content
                else:
                    self._state = self._after_start
            elif self._state == "think":
                at = buffer.find(CLOSE)
                if at >= 0:
                    reasoning += buffer[:at]
                    self._state, buffer = "content", buffer[at + len(CLOSE) :]
                    continue
                keep = partial_marker(buffer, CLOSE)
                reasoning += buffer[: len(buffer) - keep]
                self._held = buffer[len(buffer) - keep :]
                return reasoning, content
            else:
                content += buffer
                buffer = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """At the end: what was held back (reasoning if inside it, else content)."""
        held, self._held = self._held, ""
        inside = self._state == "think" or (self._state, self._after_start) == ("start", "think")
        if not inside:
            return "", held
        return (held if self._keep else ""), ""


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
