"""The state of one request inside the worker: its tokens, how many are in the KV cache, and
its sampling state."""

from __future__ import annotations

from enum import Enum

import torch

from mell.common.sampling import FinishReason, SamplingParams, TokenLogprobs
from mell.workerd.model.grammar import Guide


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # held out of the batch while it migrates away (blocks kept)
    FINISHED = "finished"


class Sequence:
    __slots__ = (
        "finish_reason",
        "generator",
        "guide",
        "new_logprobs",
        "new_tokens",
        "num_computed",
        "num_preemptions",
        "num_prompt_tokens",
        "output_token_ids",
        "prompt_logprobs",
        "request_id",
        "sampling",
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
        self.token_ids = list(prompt_token_ids)  # prompt, then everything generated
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_preemptions = 0  # a migration copying its blocks aborts when this changes
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        self.generator: torch.Generator | None = None
        if sampling.seed is not None and not sampling.is_greedy:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(sampling.seed & 0xFFFF_FFFF_FFFF_FFFF)
        # Produced by the current step, drained into a RequestOutput.
        self.new_tokens: list[int] = []
        self.new_logprobs: list[TokenLogprobs] = []
        self.guide: Guide | None = None  # structured output: set by the engine
        # With sampling.prompt_logprobs: entry i is prompt token i + 1's (from position i).
        self.prompt_logprobs: list[TokenLogprobs] = []

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
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING

    @property
    def is_decoding(self) -> bool:
        """Running with everything but the last sampled token in the cache."""
        return self.status is SequenceStatus.RUNNING and self.num_uncomputed == 1
