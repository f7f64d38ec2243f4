"""What the engine hands back: per-step request outputs and engine statistics (`contract.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from mell.common.sampling import FinishReason, TokenLogprobs
from mell.common.workers import WorkerStats


@dataclass(slots=True)
class RequestOutput:
    """One per request that produced tokens this step."""

    request_id: str
    first_index: int  # index (0-based, per request) of new_token_ids[0] in its output
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # parallel to new_token_ids when requested
    finish_reason: FinishReason | None  # set on the request's last output
    num_prompt_tokens: int
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., on the first output
    num_cached_tokens: int = 0  # prompt tokens whose prefill the prefix cache skipped


class EngineStats(WorkerStats, frozen=True, kw_only=True):
    """What `stats()` answers: the worker's stats (`WorkerStats`, which travel whole to the
    gateway) and what stays on the worker: the block size, the blocks per request and the
    prefix cache's hashes (from which the worker builds its load report's other parts)."""

    block_size: int
    # Blocks per request, a block shared by several counted once (for the oldest of them).
    request_blocks: dict[str, int] = msgspec.field(default_factory=dict)
    # Cached block hashes (layer 0): of blocks in use, then of free-but-cached ones (MRU first).
    cached_hashes: tuple[list[int], list[int]] = ([], [])
