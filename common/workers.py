"""What a worker is and what it holds: structs shared by the messages, the events and the view.

`WorkerIdentity` is said once in `Hello`, recorded in `WorkerJoined` and kept in the view's
worker row. `WorkerStats` is every figure a worker's engine measures; it travels whole: the
engine answers it (`workerd/engine/outputs.EngineStats` adds what stays on the worker), the
worker sends it as `WorkerLoad` (the stats and its requests) in `LoadReport`, the gateway
records that in `LoadReported`, keeps it in the view's worker row, and `/metrics` reads it
through one table (`gateway/cluster/view_metrics.py`). A new engine figure is one field here,
the line in the engine that measures it, and one row of that table. Each struct is defined once
here and embedded, never copied field by field. They encode as maps (field names), so the
journal's events stay self-describing, and every field added since the first is defaulted: a
record written before a field existed still decodes (and one with fields this version does not
know, too).
"""

from __future__ import annotations

from typing import Any

import msgspec


class WorkerIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who a worker is and what it serves, fixed for one process (one boot id)."""

    worker_id: str
    boot_id: str  # new every process start: tells a restart from a reconnect
    model: str  # served model name
    capacity_blocks: int
    block_size: int
    max_model_len: int
    data_address: str  # where peers reach this worker's data plane (migration)
    sleep_after_s: float = 0.0  # idle this long and not needed: the gateway makes it sleep


class RequestLoad(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """KV blocks and tokens of one request held by a worker."""

    request_id: str
    num_blocks: int
    num_tokens: int  # prompt + generated so far


class WorkerStats(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker's engine measured at one moment: its queues, its KV blocks and memory,
    and its counters since it started (`*_total`: they only grow within one boot). Fields
    added after the first five have defaults (see the module's docstring)."""

    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    num_preemptions_total: int
    # The host KV tier (LayerKV); zeros where the worker has none.
    num_host_total_blocks: int = 0
    num_host_free_blocks: int = 0
    num_fenced_blocks: int = 0  # both tiers: out of use while a copy still touches them
    num_swapped: int = 0  # requests whose KV waits on the host (swapped out or parked)
    num_swaps_total: int = 0  # preemptions that moved KV to the host instead of dropping it
    num_parked_total: int = 0  # prompts prefilled straight to the host
    num_tokens_recomputed_total: int = 0  # computed tokens thrown away by preemptions
    # Tokens the model computed: prefill chunks (prefix cache hits skipped, recomputation after
    # a preemption or a token transfer included) and one per decode.
    num_computed_tokens_total: int = 0
    offload_bytes_total: dict[str, int] = {}  # KV bytes copied, by direction: "d2h", "h2d"
    slo_violations_total: dict[str, int] = {}  # by kind: "ttft", "tpot"
    # Automatic prefix caching (vLLM's counting): prompt tokens looked up, tokens found cached.
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    # Sleep (`messages.Sleep`): the KV memory is given back, these many bytes of it.
    sleeping: bool = False
    kv_bytes_released: int = 0
    # The KV pool's memory (elastic under memory_budget_bytes; else the cap is the whole pool
    # and the counters stay 0): the cap in blocks, the bytes it holds now, the cap's changes
    # by direction ("shrink", "grow"), blocks moved below a shrunk cap, requests preempted for
    # it, times the memory above the live blocks was given back.
    kv_pool_cap_blocks: int = 0
    kv_pool_mapped_bytes: int = 0
    kv_pool_resizes_total: dict[str, int] = {}
    kv_pool_blocks_moved_total: int = 0
    kv_pool_victims_total: int = 0
    kv_pool_trims_total: int = 0

    def figures(self) -> dict[str, Any]:
        """The `WorkerStats` fields of this value, by name (a subclass's own fields left out):
        what carries the stats whole into another subclass (`WorkerLoad.of`)."""
        return {name: getattr(self, name) for name in WorkerStats.__struct_fields__}


class WorkerLoad(WorkerStats, frozen=True, kw_only=True):
    """A worker's load at one moment: its stats and the requests it holds (journaled)."""

    requests: list[RequestLoad] = []

    @classmethod
    def of(cls, stats: WorkerStats, requests: list[RequestLoad]) -> WorkerLoad:
        """`stats` whole (whatever `WorkerStats` subclass it is) with the worker's requests."""
        return cls(**stats.figures(), requests=requests)

    @classmethod
    def idle(cls, num_total_blocks: int, num_preemptions_total: int = 0) -> WorkerLoad:
        """Nothing running, every block free (before the first report, or once lost)."""
        return cls(
            num_running=0,
            num_waiting=0,
            num_total_blocks=num_total_blocks,
            num_free_blocks=num_total_blocks,
            num_preemptions_total=num_preemptions_total,
        )


class CachedPrefixes(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A bounded summary of a worker's prefix cache: the chained hashes
    (`mell.common.hashing`, one per KV block) of its cached prompt blocks, those running
    requests hold apart from the free-but-cached ones (which eviction may take next). Exact
    sets, at most a few thousand hashes (8 bytes each): the most recently used when the cache
    holds more. Sent in `LoadReport`, kept by the gateway's view as soft state (not journaled:
    the next report refills it)."""

    in_use: list[int] = []
    free: list[int] = []
