"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any content (vLLM's
`mistral` parser). `[TOOL_CALLS]` is a control token, so the output is decoded with special
tokens kept; call ids are 9 letters and digits, as Mistral's chat templates require."""

from __future__ import annotations

import secrets
import string
from typing import ClassVar

from mell.gateway.api.reasoning import partial_marker
from mell.gateway.api.tools.parser import CallParser, Start

OPEN = "[TOOL_CALLS]"
_ALPHABET = string.ascii_letters + string.digits


class MistralParser(CallParser):
    skip_special_tokens: ClassVar[bool] = False

    def calls_start(self, text: str) -> Start:
        at = text.find(OPEN)
        if at >= 0:
            return Start(at, at)
        return Start(None, len(text) - partial_marker(text, OPEN))

    def new_id(self) -> str:
        return "".join(secrets.choice(_ALPHABET) for _ in range(9))
