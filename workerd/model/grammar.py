"""Structured output: a request's grammar (llguidance) as a mask over the next token.

A `Guide` follows one request's output through its grammar (llguidance's LLMatcher: JSON
schema, regex, choice or Lark, compiled at the gateway into llguidance's grammar text). Each
step it writes the allowed tokens as a bitmask row (one bit per token, int32 words) on the
host; `apply_masks` sends the [R, vocab/32] words to the logits' device and sets every
disallowed logit to -inf there. Rows never read each other, so masking is batch-invariant.
llguidance was chosen over xgrammar by measured mask cost (see the README) and because it
needs no other package.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import llguidance
import llguidance.torch as llg_torch
import torch

from mell.common.errors import InvalidRequest


@lru_cache(maxsize=4)
def grammar_tokenizer(
    tokenizer_json: Path, vocab_size: int, eos_ids: tuple[int, ...]
) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (built once per model: about a second)."""
    return llguidance.LLTokenizer(
        tokenizer_json.read_text(), n_vocab=vocab_size, eos_token=list(eos_ids)
    )


@lru_cache(maxsize=64)
def _compiled(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A fresh matcher of `grammar`, compiled once and copied for each request using it."""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        error = matcher.get_error()[:300]
        raise InvalidRequest(f"invalid grammar: {error}", param="response_format")
    return matcher


class Guide:
    """One request's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, tokens: list[int]) -> None:
        """The guide after `tokens` (a request's output so far: replayed when it migrates)."""
        self._matcher = _compiled(tokenizer, grammar).deep_copy()
        if tokens and not self._matcher.consume_tokens(tokens):
            raise InvalidRequest("the output so far does not follow the grammar")

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows no further token."""
        return bool(self._matcher.is_stopped())


def apply_masks(logits: torch.Tensor, rows: list[int], guides: list[Guide]) -> torch.Tensor:
    """`logits` with the tokens each guided row's grammar forbids set to -inf (in place);
    `rows` ascending."""
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)  # each fill writes its whole row
    llg_torch.fill_next_token_bitmask_par(
        _executor(), [(g._matcher, j) for j, g in enumerate(guides)], bitmask
    )
    bits = (bitmask.to(logits.device)[:, :, None] >> _shifts(logits.device)) & 1
    forbidden = bits.reshape(len(rows), words * 32)[:, :vocab] == 0
    if len(rows) == logits.shape[0]:  # every row guided: rows are in order
        return logits.masked_fill_(forbidden, float("-inf"))
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))
    return logits


_SHIFTS: dict[torch.device, torch.Tensor] = {}


@lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool: all of a step's masks in one call, in parallel."""
    return llguidance.LLExecutor()


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return _SHIFTS[device]
