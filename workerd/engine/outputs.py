"""What the engine hands back: per-step request outputs and engine statistics (`contract.py`)."""

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
    num_cached_tokens: int = 0  # prompt tokens whose prefill the prefix cache skipped


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    block_size: int
    num_preemptions_total: int
    # Blocks per request, a block shared by several counted once (for the oldest of them).
    request_blocks: dict[str, int] = field(default_factory=dict)
    # The host KV tier (LayerKV; zeros when kv_offload is "off").
    num_host_total_blocks: int = 0
    num_host_free_blocks: int = 0
    num_fenced_blocks: int = 0  # both tiers: out of use, a copy still in flight
    num_swapped: int = 0  # requests whose KV waits on the host (swapped out or parked)
    num_swaps_total: int = 0  # preemptions that moved KV to the host instead of dropping it
    num_parked_total: int = 0  # prompts prefilled straight to the host
    num_tokens_recomputed_total: int = 0  # computed tokens thrown away by preemptions
    offload_bytes_total: dict[str, int] = field(default_factory=dict)  # "d2h", "h2d"
    slo_violations_total: dict[str, int] = field(default_factory=dict)  # "ttft", "tpot"
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens found cached
    # Cached block hashes (layer 0): of blocks in use, then of free-but-cached ones (MRU first).
    cached_hashes: tuple[list[int], list[int]] = ([], [])
    sleeping: bool = False  # the KV cache is given back (`sleep`) until `wake`
    kv_bytes_released: int = 0  # bytes of KV memory given back while sleeping
    # The KV pool's memory (elastic.py under memory_budget_bytes; without a budget: the cap is
    # the whole pool, the counters stay 0). The cap in blocks, the bytes the pool holds now.
    kv_pool_cap_blocks: int = 0
    kv_pool_mapped_bytes: int = 0
    kv_pool_resizes_total: dict[str, int] = field(default_factory=dict)  # "shrink", "grow"
    kv_pool_blocks_moved_total: int = 0  # blocks moved down below a shrunk cap
    kv_pool_victims_total: int = 0  # requests preempted to clear blocks above the cap
    kv_pool_trims_total: int = 0  # times memory above the live blocks was given back
