"""Qwen2.5 / Qwen3 (Hermes style): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
one block per call, after any content (vLLM's `hermes` parser)."""

from __future__ import annotations

from mell.gateway.api.reasoning import partial_marker
from mell.gateway.api.tools.parser import CallParser, Start

OPEN = "<tool_call>"


class HermesParser(CallParser):
    def calls_start(self, text: str) -> Start:
        at = text.find(OPEN)
        if at >= 0:
            return Start(at, at)
        return Start(None, len(text) - partial_marker(text, OPEN))
