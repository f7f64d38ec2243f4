"""The state of one request inside the worker: its tokens, how many are in the KV cache, and
its sampling randomness.

A seeded request's randomness is a pure function of (seed, output index): the generator for
its next token is seeded from a hash of both (`token_generator`). No sampler state lives only
on one worker: a request resumed elsewhere from its tokens alone draws the same noise.
"""

from __future__ import annotations

import itertools
import time
from enum import Enum

import torch

from mell.common.sampling import FinishReason, SamplingParams, TokenLogprobs
from mell.common.slo import RequestSLO
from mell.workerd.model.grammar import Guide

_arrivals = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # held out of the batch while it migrates away (blocks kept)
    STAGING = "staging"  # its prompt is prefilled this step straight to the host tier
    HOSTED = "hosted"  # its KV is on the host tier (swapped out or parked), to be reloaded
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "added_at",
        "arrival",
        "finish_reason",
        "first_token_at",
        "guide",
        "new_logprobs",
        "new_tokens",
        "num_cached_tokens",
        "num_computed",
        "num_hashed_blocks",
        "num_preemptions",
        "num_prompt_tokens",
        "output_token_ids",
        "prefix_hashes",
        "prompt_logprobs",
        "request_id",
        "sampling",
        "slo",
        "status",
        "stop_ids",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: list[int],
    ) -> None:
        self.request_id = request_id
        self.added_at = time.monotonic()
        self.arrival = next(_arrivals)  # order of arrival (who is reloaded first)
        self.first_token_at = 0.0  # monotonic time of the first output token (0: none yet)
        self.token_ids = list(prompt_token_ids)  # prompt, then everything generated
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.slo: RequestSLO | None = None  # its own SLOs (None: the engine's defaults)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_preemptions = 0  # a migration copying its blocks aborts when this changes
        # Prefix caching: the chained hashes of the prompt's full blocks (empty: caching off),
        # how many of its leading blocks are cached under them, and the prompt tokens found
        # cached at its first admission (-1: not admitted yet).
        self.prefix_hashes: list[int] = []
        self.num_hashed_blocks = 0
        self.num_cached_tokens = -1
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        # Produced by the current step, drained into a RequestOutput.
        self.new_tokens: list[int] = []
        self.new_logprobs: list[TokenLogprobs] = []
        self.guide: Guide | None = None  # structured output: set by the engine
        # With sampling.prompt_logprobs: entry i is prompt token i + 1's (from position i).
        self.prompt_logprobs: list[TokenLogprobs] = []

    def token_generator(self, device: torch.device | None = None) -> torch.Generator | None:
        """The generator for this request's next token, on `device` (default the CPU), where
        the sampler draws its noise (None: unseeded, the shared one). The same (seed, index)
        gives the same draws on one kind of device; a CUDA generator's differ from a CPU's."""
        if self.sampling.seed is None or self.sampling.is_greedy:
            return None
        generator = torch.Generator(device=device or "cpu")
        generator.manual_seed(token_seed(self.sampling.seed, len(self.output_token_ids)))
        return generator

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, max_model_len: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.new_tokens.append(token_id)
        if self.guide is not None:
            self.guide.consume(token_id)
        if token_id in self.stop_ids or (self.guide is not None and self.guide.stopped):
            self.finish_reason = FinishReason.STOP
        elif (
            len(self.output_token_ids) >= self.sampling.max_tokens
            or len(self.token_ids) >= max_model_len
        ):
            self.finish_reason = FinishReason.LENGTH
        if self.finish_reason is not None:
            self.status = SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is gone; prompt and generated tokens are prefilled again."""
        self.num_computed = 0
        self.num_hashed_blocks = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING

    @property
    def is_decoding(self) -> bool:
        """Running with everything but the last sampled token in the cache."""
        return self.status is SequenceStatus.RUNNING and self.num_uncomputed == 1


_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def token_seed(seed: int, index: int) -> int:
    """A 64-bit seed for output token `index` of a request seeded with `seed` (splitmix64 of
    both: neighbouring seeds and indices give unrelated streams)."""
    z = ((seed & _MASK64) * 0x9E37_79B9_7F4A_7C15 + index + 1) & _MASK64
    for shift, mult in ((30, 0xBF58_476D_1CE4_E5B9), (27, 0x94D0_49BB_1331_11EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    return z ^ (z >> 31)
