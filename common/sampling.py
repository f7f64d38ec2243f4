"""Sampling parameters of one request, their validation, and the reasons a request finishes.

`SamplingParams` travels gateway → worker inside `AddRequest`; validation happens at the gateway
edge (HTTP body) and again when a worker admits a request.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from mell.common.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


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
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingParams:
        """Return self, or raise InvalidRequest naming the offending parameter."""
        _check(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or positive")
        if self.seed is not None:
            _check(_INT64_MIN <= self.seed <= _INT64_MAX, "seed", "must fit in int64")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"must be in [0, {MAX_TOP_LOGPROBS}]",
            )
        return self


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Log-probability of one sampled token and the top-N alternatives (ids and logprobs)."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


def _check(ok: bool, param: str, what: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param} {what}", param=param)
