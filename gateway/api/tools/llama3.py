"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the output is `{"name": ..., "parameters": {...}}`
(several joined by `;`), optionally after `<|python_tag|>` (vLLM's `llama3_json` parser). Only an
output that starts so is a call; any other output is all content."""

from __future__ import annotations

from mell.gateway.api.tools.parser import CallParser, Start

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(CallParser):
    def calls_start(self, text: str) -> Start:
        head = text.lstrip()
        if head.startswith(("{", PYTHON_TAG)):
            return Start(0, 0)
        if PYTHON_TAG.startswith(head):  # empty, or maybe the tag: wait
            return Start(None, 0)
        return Start(None, 0, never=True)
