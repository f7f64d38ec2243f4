"""Reasoning split at </think>, streamed in any pieces, as vLLM's deepseek_r1 and qwen3
parsers split it."""

from __future__ import annotations

import pytest

from mell.gateway.api.chat_template import ChatTemplate
from mell.gateway.api.reasoning import ReasoningSplitter, Style, reasoning_style

CASES = [
    ("deepseek_r1", "I think</think>The answer", ("I think", "The answer")),
    ("deepseek_r1", "<think>I think</think>The answer", ("I think", "The answer")),
    ("deepseek_r1", "still thinking", ("still thinking", "")),
    ("qwen3", "<think>\nhmm\n</think>\n\nYes", ("\nhmm\n", "\n\nYes")),
    ("qwen3", "No thinking here", ("", "No thinking here")),
    ("qwen3", "<thi", ("", "<thi")),
    ("qwen3", "a </think> b", ("", "a </think> b")),
]


@pytest.mark.parametrize(("style", "text", "want"), CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_split_in_any_pieces(style: Style, text: str, want: tuple[str, str], size: int) -> None:
    splitter = ReasoningSplitter(style)
    reasoning, content = "", ""
    for i in range(0, len(text), size):
        r, c = splitter.feed(text[i : i + size])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    assert (reasoning + r, content + c) == want


def test_style_from_the_template() -> None:
    plain = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert reasoning_style(plain) is None
    r1 = ChatTemplate(
        "{% for m in messages %}{{ m.content | replace('</think>', '') }}{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
    )
    assert reasoning_style(r1) == "deepseek_r1"
    qwen = ChatTemplate(
        "{% for m in messages %}{{ m.content.split('</think>')[-1] }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert reasoning_style(qwen) == "qwen3"
