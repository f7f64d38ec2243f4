"""Sampling parameters of one request, their validation, and the reasons a request finishes.

`SamplingParams` travels gateway → worker inside `AddRequest`; validation happens at the gateway
edge (HTTP body) and again when a worker admits a request.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from mell.common.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1


class FinishReason(StrEnum):
    """Why a request stopped; values are the OpenAI `finish_reason` strings."""

    STOP = "stop"  # EOS, a stop token id, or a stop string (the gateway decides the latter)
    LENGTH = "length"  # max_tokens or the model's context length reached
    ABORT = "abort"  # aborted by the client, the operator or a failure


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens for one request.

    temperature == 0 means greedy. top_k <= 0 and top_p == 1 disable those filters.
    `seed` makes sampling reproducible per request, independent of batching.
    `logprobs` is None for none, else the number N >= 0 of top alternatives reported beside the
    sampled token's own log-probability. Stop strings are applied by the gateway, not here.

    Logit processing, with vLLM's semantics and order, before temperature: `logit_bias` added
    (token id -> bias in [-100, 100]); stop tokens masked while fewer than `min_tokens` were
    generated; `repetition_penalty` (> 0, 1 = off) divides positive and multiplies negative
    logits of every token seen in the prompt or the output; `frequency_penalty` and
    `presence_penalty` (in [-2, 2]) subtract count * f and (count > 0) * p for output tokens.
    After temperature: `min_p` (in [0, 1]) drops tokens less likely than min_p * the best one.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    min_p: float = 0.0
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # top-N alternatives per prompt token (vLLM)
    grammar: str | None = None  # structured output: llguidance's grammar text

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether the logits depend on the tokens seen so far (penalties)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before temperature (grammar, bias, min_tokens,
        penalties)."""
        return (
            bool(self.logit_bias)
            or self.min_tokens > 0
            or self.has_penalties
            or self.grammar is not None
        )

    def validate(self) -> SamplingParams:
        """Return self, or raise InvalidRequest naming the offending parameter."""
        _check(1 <= self.max_tokens <= _INT32_MAX, "max_tokens", "must be in [1, 2**31-1]")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(-1 <= self.top_k <= _INT32_MAX, "top_k", "must be -1, 0 (disabled) or positive")
        if self.seed is not None:
            _check(INT64_MIN <= self.seed <= INT64_MAX, "seed", "must fit in int64")
        _check(
            all(0 <= t <= _INT32_MAX for t in self.stop_token_ids),
            "stop_token_ids",
            "must be token ids (0 <= id < 2**31)",
        )
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0**31, "repetition_penalty", "must be positive")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]")
        _check(
            all(0 <= t <= _INT32_MAX for t in self.logit_bias),
            "logit_bias",
            "keys must be token ids (0 <= id < 2**31)",
        )
        _check(
            all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
            "logit_bias",
            "values must be in [-100, 100]",
        )
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            _check(
                n is None or 0 <= n <= MAX_TOP_LOGPROBS, name, f"must be in [0, {MAX_TOP_LOGPROBS}]"
            )
        return self


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Log-probability of one sampled (or prompt) token and the top-N alternatives (ids and
    logprobs); `rank` (1 = most likely) is computed for prompt tokens."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]
    rank: int | None = None


def _check(ok: bool, param: str, what: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param} {what}", param=param)
