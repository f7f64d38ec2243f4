"""The worker-side scheduler: continuous batching with chunked prefill and preemption.

Each step has a token budget (`max_num_batched_tokens`). Running requests come first, in
arrival order: each gets its remaining tokens (1 when decoding, a chunk when prefilling) if
the budget and the KV pool allow. When blocks run out, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the head of the waiting queue,
to be recomputed later from its tokens (nothing it already emitted is emitted again). Waiting
requests are admitted in order while the budget, `max_num_seqs` and the pool allow; a step
that had to preempt admits nobody.

Admission rule (`admission`): "whole" admits a waiting request only when blocks for all its
tokens are free, and reserves them all at once, so that a chunked prefill never runs out of
blocks half way (and never preempts itself); "chunk" (the old rule) reserves only the first
chunk's blocks and grows them chunk by chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """What runs this step: requests, how many of their tokens each computes, and where their
    KV lives: `layer_tables[layer][i]` is the block table of `seqs[i]` in that layer (the same
    list object for every layer when all the requests' layers are alike). The runner reads
    blocks from here, never from the block manager."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    layer_tables: list[list[list[int]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: str = "whole",
    ) -> None:
        if admission not in ("whole", "chunk"):
            raise ValueError(f"unknown admission rule {admission!r}")
        self.blocks = blocks
        self.whole_prompt = admission == "whole"
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self.num_tokens_recomputed_total = 0  # computed tokens thrown away by preemptions

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a request (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.request_id)

    def pause(self, seq: Sequence) -> None:
        """Take a request out of the batch, keeping its blocks (it is migrating away)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        """Put a paused (or migrated-in) request back: running when its cache is filled and
        there is room in the batch, else at the head of the waiting queue."""
        if seq.num_computed > 0 and len(self.running) < self.max_num_seqs:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if not batch.preempted:
            self._admit_waiting(batch, budget)
        batch.layer_tables = self._layer_tables(batch.seqs)
        return batch

    def _layer_tables(self, seqs: list[Sequence]) -> list[list[list[int]]]:
        """Block tables per layer; the same list object for all layers when all are uniform."""
        ids = [s.request_id for s in seqs]
        blocks = self.blocks
        if all(blocks.is_uniform(r) for r in ids):
            return [[blocks.block_table(r, 0) for r in ids]] * blocks.num_layers
        return [[blocks.block_table(r, layer) for r in ids] for layer in range(blocks.num_layers)]

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            target = seq.num_computed + n
            while not self.blocks.can_append(seq.request_id, target):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq.request_id, target)
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # seq preempted itself: everything after it is gone too
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            reserve = seq.num_tokens if self.whole_prompt else seq.num_computed + n
            if not self._fits(seq, reserve):
                break
            self.waiting.popleft()
            self.blocks.append(seq.request_id, reserve)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` of `seq` are free; under the whole-prompt rule also a block
        of headroom per running request (each may start a new block within block_size steps,
        and the newcomer, admitted last, would be their first victim)."""
        if not self.whole_prompt:
            return self.blocks.can_append(seq.request_id, num_tokens)
        need = self.blocks.blocks_needed(seq.request_id, num_tokens)
        return need + len(self.running) <= self.blocks.num_free()

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        self.num_tokens_recomputed_total += seq.num_computed
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions_total += 1
