"""What the engine hands back: per-step request outputs and engine statistics (contract A)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mell.common.sampling import FinishReason, TokenLogprobs


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


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    block_size: int
    num_preemptions_total: int
    request_blocks: dict[str, int] = field(default_factory=dict)
