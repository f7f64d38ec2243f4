"""The elastic KV pool in the scheduler's step: applies the memory budget's decisions
(memory_budget.py) to the block manager and the KV storage (kv_memory.py).

Before a step is scheduled (`before_schedule`): the budget plans the step (its token budget and
the KV cap); the block manager hands out only blocks below the cap; while live blocks lie above
it, up to COMPACT_BLOCKS_PER_STEP of them move down into free blocks below it (their KV copied,
the block tables rewritten), and when none is free below, one running request holding blocks
above it is preempted (swapped to the host tier when that pays, else recomputed): a lazy
balloon. Before the next step is scheduled (`trim`): when the live top has stayed a slack below
what the storage holds for TRIM_AFTER_STEPS rounds (at once when nothing is live), the memory
above it is given back (free blocks cached for prefix reuse
above the live top are dropped first).

Only requests that are running and not being loaded from the host move: a paused (migrating)
request's blocks, and blocks a copy touches (fenced), stay where they are. A request whose
blocks moved counts as preempted for a migration (`num_preemptions`): one copying its blocks
in an earlier stage, from views of the cache, aborts rather than send a block reused since.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec

from mell.common.workers import WorkerStats
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.kv_cache import KVCache
from mell.workerd.engine.memory_budget import MemoryBudget, StepMemory
from mell.workerd.engine.sequence import Sequence
from mell.workerd.heap import give_back_free_memory

if TYPE_CHECKING:
    from mell.workerd.engine.scheduler import ScheduledBatch, Scheduler

COMPACT_BLOCKS_PER_STEP = 64
TRIM_SLACK_FRACTION = 16  # give memory back once 1/16 of the pool above the live top is idle
TRIM_AFTER_STEPS = 8  # ... for this many scheduling rounds in a row (no churn within a burst)

S = TypeVar("S", bound=WorkerStats)


class ElasticPool:
    def __init__(self, budget: MemoryBudget, blocks: BlockManager, kv: KVCache) -> None:
        self.budget = budget
        self.blocks = blocks
        self.kv = kv
        self.trim_slack = max(budget.max_blocks // TRIM_SLACK_FRACTION, 1)
        self.last: StepMemory | None = None  # the last step's accounting
        self.max_batch = 0  # the most requests in one step
        self.blocks_moved_total = 0
        self.victims_total = 0
        self.trims_total = 0
        self._idle_rounds = 0  # rounds in a row with the slack above the live top idle

    def before_schedule(self, sch: Scheduler, batch: ScheduledBatch) -> int:
        """Plan the step; returns its token budget (at most max_num_batched_tokens)."""
        decodes = sum(1 for s in sch.running if s.num_uncomputed == 1)
        prefill = _next_prefill(sch)
        tokens = prefill.num_uncomputed if prefill is not None else 0
        need = self.blocks.blocks_for(prefill.num_tokens) if prefill is not None else 0
        if sch.hosted:  # (reloaded ahead of new prompts: the cap must let it back too)
            need = max(need, self.blocks.blocks_for(sch.hosted[0].num_tokens))
        self.budget.plan(self.blocks.top(), decodes, tokens, need, len(sch.running))
        cap = self.budget.cap
        if self.blocks.limit != cap:
            self.blocks.set_limit(cap)
        if self.blocks.top() > cap and not self._compact(sch, cap):
            self._evict_one(sch, batch, cap, prefill)
        extent = max(cap, self.blocks.top())
        return min(sch.max_num_batched_tokens, self.budget.tokens_for(extent))

    def after_schedule(self, batch: ScheduledBatch) -> None:
        self.commit()
        tokens = sum(batch.num_tokens)
        self.last = self.budget.account(self.blocks.top(), tokens)
        self.max_batch = max(self.max_batch, len(batch.seqs))

    def commit(self) -> None:
        """Back every block handed out (the storage maps them where it must; on CPU the
        kernel commits pages as they are written)."""
        if self.kv.storage is not None:
            self.kv.storage.commit(self.blocks.top())

    def trim(self) -> None:
        """Give back the memory above the live top, when enough of it is idle."""
        storage = self.kv.storage
        if storage is None:
            return
        live = self.blocks.top(cached=False)
        held = storage.mapped_bytes() // max(self.budget.block_bytes, 1)
        if held - live < self.trim_slack:
            self._idle_rounds = 0
            return
        self._idle_rounds += 1
        if self._idle_rounds < TRIM_AFTER_STEPS and live > 0:
            return  # (a pool with nothing live at all gives its memory back at once)
        self._idle_rounds = 0
        cap = self.blocks.limit
        self.blocks.set_limit(min(live, cap))  # (drops cached free blocks above it)
        self.blocks.set_limit(cap)
        storage.discard(live)
        self.trims_total += 1
        if live == 0 and self.kv.device.type == "cpu":
            give_back_free_memory()  # (idle: the activations' freed memory goes back too)

    def with_counts(self, stats: S) -> S:
        """`stats` with the pool's cap and counters in it."""
        return msgspec.structs.replace(
            stats,
            kv_pool_cap_blocks=self.budget.cap,
            kv_pool_resizes_total={"shrink": self.budget.shrinks, "grow": self.budget.grows},
            kv_pool_blocks_moved_total=self.blocks_moved_total,
            kv_pool_victims_total=self.victims_total,
            kv_pool_trims_total=self.trims_total,
        )

    def _compact(self, sch: Scheduler, cap: int) -> bool:
        """Move up to COMPACT_BLOCKS_PER_STEP live blocks from above the cap down; True if
        some moved."""
        movable = {
            s.request_id: s
            for s in sch.running
            if sch.tier is None or s.request_id not in sch.tier.loading
        }
        holders = [r for r in self.blocks.holders_above(cap) if r in movable]
        moved: set[str] = set()
        budget = COMPACT_BLOCKS_PER_STEP
        for layer in range(self.blocks.num_layers):
            moves: list[tuple[int, int]] = []
            for rid in holders:
                for block in sorted({b for b in self.blocks.block_table(rid, layer) if b >= cap}):
                    if budget <= 0:
                        break
                    try:
                        new = self.blocks.relocate(layer, block, holders)
                    except ValueError:  # a holder that may not move (paused, loading)
                        continue
                    if new is None:
                        break
                    moves.append((block, new))
                    moved.update(r for r in holders if new in self.blocks.block_table(r, layer))
                    budget -= 1
            self.kv.move_blocks(layer, moves)
            self.blocks_moved_total += len(moves)
        for rid in moved:  # a migration reading its blocks (zero-copy frames) aborts
            movable[rid].num_preemptions += 1
        return budget < COMPACT_BLOCKS_PER_STEP

    def _evict_one(
        self, sch: Scheduler, batch: ScheduledBatch, cap: int, keep: Sequence | None
    ) -> None:
        """Preempt the latest running request holding blocks above the cap (not `keep`)."""
        above = set(self.blocks.holders_above(cap))
        for seq in reversed(sch.running):
            if seq.request_id in above and seq is not keep:
                sch.evict(seq, batch)
                self.victims_total += 1
                return


def _next_prefill(sch: Scheduler) -> Sequence | None:
    """The prefill the step would run first: a running request with more than one token
    left, else the head of the waiting queue."""
    for seq in sch.running:
        if seq.num_uncomputed > 1:
            return seq
    return sch.waiting[0] if sch.waiting else None
