"""Detokenization never splits a UTF-8 character; stop strings are never partly emitted."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from mell.gateway.api.detokenizer import Detokenizer
from mell.gateway.api.stop_strings import StopMatcher

TEXTS = ["héllo wörld", "你好，世界", "emoji 🎉🚀 ok", "plain ascii text", "mixé 日本 🎉 end"]


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_gives_whole_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = Detokenizer(tokenizer)
    pieces = [detok.step([t]) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multi_byte_character_spread_over_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🎉", add_special_tokens=False).ids
    assert len(ids) > 1  # byte-level BPE splits the emoji into byte tokens
    detok = Detokenizer(tokenizer)
    assert [detok.step([t]) for t in ids][:-1] == [""] * (len(ids) - 1)


def test_batched_steps_equal_single_steps(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXTS[-1], add_special_tokens=False).ids
    detok = Detokenizer(tokenizer)
    assert detok.step(ids[:3]) + detok.step(ids[3:]) == TEXTS[-1]


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("<|im_end|>")
    detok = Detokenizer(tokenizer)
    assert detok.step([eos]) == ""


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected", "stopped"),
    [
        (["END"], ["abc", "E", "N", "D", "zzz"], "abc", True),
        (["END"], ["abcEN", "Dxyz"], "abc", True),
        (["END"], ["abcE", "Nx"], "abcENx", False),
        (["\n\n", "###"], ["line\n", "\nnext"], "line", True),
        (["xy"], ["a", "x"], "ax", False),  # held back, then flushed at the end
        (["stop", "op"], ["xst", "op!"], "x", True),  # the earliest match wins
    ],
)
def test_stop_strings(stops: list[str], pieces: list[str], expected: str, stopped: bool) -> None:
    assert _run(stops, pieces) == (expected, stopped)


def test_partial_stop_string_is_held_back() -> None:
    matcher = StopMatcher(["<END>"])
    assert matcher.feed("hello <E") == "hello "
    assert matcher.feed("N") == ""
    assert matcher.feed("X") == "<ENX"


def test_finished_text_equals_the_decode_of_its_ids(tokenizer: Tokenizer) -> None:
    """A request that ends inside a multi-byte character: its text is the tokenizer's decode,
    the incomplete bytes as U+FFFD (not dropped)."""
    from mell.common.messages import TokenOutput
    from mell.gateway.api.chunks import CompletionFormat
    from mell.gateway.api.generation import TextOutput

    ids = tokenizer.encode("ok 🎉", add_special_tokens=False).ids[:-1]  # cut the emoji short
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected.endswith("\ufffd")
    text = TextOutput(CompletionFormat("cmpl-1", "m", 0, tokenizer), [], False)
    last = len(ids) - 1
    pieces = [
        text.feed([TokenOutput("r", i, [t], None, None, 1)])[0] for i, t in enumerate(ids[:last])
    ]
    pieces.append(text.feed([TokenOutput("r", len(ids) - 1, ids[-1:], None, "length", 1)])[0])
    assert "".join(pieces) == expected
