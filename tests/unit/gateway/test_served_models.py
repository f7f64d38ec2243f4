"""ModelRegistry.encode: a long prompt, tokenized in a pool process, gets the same ids as the
tokenizer gives inline, and the memory file that carried it is closed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mell.common.errors import InvalidRequest
from mell.common.tiny_model import ensure_tiny_model
from mell.gateway.api.served_models import ModelRegistry, ServedModel

TEXT = "Grüße from the tokenizer process, with a little UTF-8: ✓ π é. "


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_long_prompts_get_the_inline_ids_and_leave_no_descriptor(tmp_path: Path) -> None:
    model = ServedModel.load(str(ensure_tiny_model(tmp_path / "mell-tiny")), tmp_path)
    registry = ModelRegistry([model], inline_chars=16)
    try:
        warm = [registry.encode(model, TEXT, True) for _ in range(4)]
        await asyncio.gather(*warm)  # starts both pool processes
        fds = open_fds()
        for add in (True, False):
            ids = await registry.encode(model, TEXT * 3, add)
            assert ids == model.tokenizer.encode(TEXT * 3, add_special_tokens=add).ids
        with pytest.raises(InvalidRequest, match="maximum context length"):
            await registry.encode(model, "ab " * 3000, True)  # over mell-tiny's 2048 tokens
        assert open_fds() == fds
    finally:
        registry.close(wait=True)
