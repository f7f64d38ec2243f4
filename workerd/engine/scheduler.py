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

With a host tier (`tier`, LayerKV; the mechanism is in host_tier.py) the policy grows:
- preemption swaps a victim's KV to the host instead of dropping it, when the host has room
  and the copy (out and back, at the link speed) costs less than recomputing its tokens;
  blocks being copied out come back soon, so a step that is short only of those waits
  rather than preempting more;
- requests on the host are reloaded, oldest arrival first, ahead of new admissions (a new
  prompt is not given device blocks while an older request waits on the host);
- "layerwise": a fresh prompt whose KV does not fit in device blocks is prefilled in one pass
  straight to the host (staged: the only prefill of its step, alongside decodes), its first
  token sampled, and parked on the host until reloaded;
- prefix caching: a request admitted with no KV first shares the cached blocks of its longest
  cached prefix (`Sequence.prefix_hashes`; the block manager's cache): its prefill starts
  after them. At most (tokens - 1) // block_size blocks are shared, so at least one token is
  computed (its logits give the next token) and no shared block is ever written;
- SLO-aware admission (`tpot_slo_s` > 0): a prefill chunk joins a step only if the time the
  step-time model says it adds fits in every running request's TPOT slack.
- an elastic pool (`elastic`, elastic.py; memory_budget_bytes) sets each step's token budget
  and the KV cap together, before anything is scheduled; a staged prompt must fit in it too.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.host_tier import HostTier
from mell.workerd.engine.sequence import Sequence, SequenceStatus
from mell.workerd.engine.step_model import StepTimeModel

if TYPE_CHECKING:
    from mell.workerd.engine.elastic import ElasticPool

FORCED_SWAP_PROBABILITY = 0.25  # kv_offload_force: chance per step of a random swap-out


@dataclass(slots=True)
class ScheduledBatch:
    """What runs this step: requests, how many of their tokens each computes, and where their
    KV lives: `layer_tables[layer][i]` is the block table of `seqs[i]` in that layer (the same
    list object for every layer when all the requests' layers are alike; empty for a staged
    prompt, whose K/V go to the host tier). The runner reads blocks from here, never from the
    block manager."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    layer_tables: list[list[list[int]]] = field(default_factory=list)
    staged: list[Sequence] = field(default_factory=list)  # prefilled straight to the host

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass(frozen=True, slots=True)
class OffloadPolicy:
    """How the scheduler uses the host tier (see the module docstring)."""

    layerwise: bool = False
    block_bytes: int = 0  # one block, every layer (the swap cost model)
    link_bytes_per_s: float = 0.0  # 0: unknown (a swap is taken to cost nothing)
    force: bool = False  # tests: stage every fresh prompt, swap at random
    seed: int = 0


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: str = "whole",
        tier: HostTier | None = None,
        offload: OffloadPolicy | None = None,
        step_model: StepTimeModel | None = None,
        tpot_slo_s: float = 0.0,
        elastic: ElasticPool | None = None,
    ) -> None:
        if admission not in ("whole", "chunk"):
            raise ValueError(f"unknown admission rule {admission!r}")
        self.blocks = blocks
        self.whole_prompt = admission == "whole"
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.tier = tier
        self.offload = offload or OffloadPolicy()
        self.step_model = step_model or StepTimeModel()
        self.elastic = elastic
        self._step_tokens = max_num_batched_tokens  # this step's token budget
        self.tpot_slo_s = tpot_slo_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.hosted: list[Sequence] = []  # KV on the host tier, by arrival
        self.num_preemptions_total = 0
        self.num_tokens_recomputed_total = 0  # computed tokens thrown away by preemptions
        self.num_swaps_total = 0  # preemptions that moved KV to the host
        self.num_parked_total = 0  # prompts prefilled straight to the host
        self.prefix_queries_total = 0  # tokens of admitted requests looked up in the cache
        self.prefix_hits_total = 0  # of those, tokens found cached (their prefill skipped)
        self._rng = random.Random(self.offload.seed)
        self._slack = math.inf  # this step's smallest TPOT slack (s)
        self._stalled = False  # this step waits for blocks being copied out

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.hosted)

    def remove(self, seq: Sequence) -> None:
        """Drop a request (finished or aborted) and free its blocks (in both tiers; blocks a
        copy still touches once it is done)."""
        self._take_out(seq)
        self._release(seq)

    def pause(self, seq: Sequence) -> None:
        """Take a request out of the batch, keeping its blocks (it is migrating away), on the
        device or on the host tier."""
        self._take_out(seq)
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        """Put a paused (or migrated-in) request back: on the host tier's queue when its KV is
        there (reloaded in its turn), running when its cache is filled and there is room in
        the batch, else at the head of the waiting queue."""
        if self.tier is not None and self.tier.holds(seq.request_id):
            seq.status = SequenceStatus.HOSTED
            self._host(seq)
        elif seq.num_computed > 0 and len(self.running) < self.max_num_seqs:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def park(self, seq: Sequence) -> None:
        """A staged prompt has been prefilled (its first token sampled): it waits on the host."""
        seq.status = SequenceStatus.HOSTED
        self._host(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        if self.elastic is not None:
            budget = self.elastic.before_schedule(self, batch)
        self._step_tokens = budget
        self._stalled = False
        self._slack = self._min_slack()
        if self.offload.force and self.tier is not None:
            self._random_swap(batch)
        budget = self._schedule_running(batch, budget)
        if not batch.preempted and not self._stalled:
            budget = self._reload(batch, budget)
            self._admit_waiting(batch, budget)
        batch.layer_tables = self._layer_tables(batch.seqs)
        if self.elastic is not None:
            self.elastic.after_schedule(batch)
        return batch

    def evict(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Preempt a running request to make room (not a shortage: admissions go on)."""
        self._preempt(seq, batch)
        batch.preempted.remove(seq)

    def _layer_tables(self, seqs: list[Sequence]) -> list[list[list[int]]]:
        """Block tables per layer; the same list object for all layers when all are uniform."""
        ids = [s.request_id for s in seqs]
        blocks = self.blocks
        if all(blocks.has(r) and blocks.is_uniform(r) for r in ids):
            return [[blocks.block_table(r, 0) for r in ids]] * blocks.num_layers
        return [
            [blocks.block_table(r, layer) if blocks.has(r) else [] for r in ids]
            for layer in range(blocks.num_layers)
        ]

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n > 1 and not self._prefill_fits(batch, n):
                i += 1  # this chunk would break a TPOT SLO: not this step
                continue
            target = seq.num_computed + n
            while not self.blocks.can_append(seq.request_id, target):
                if self._copies_will_free(seq, target):
                    self._stalled = True  # blocks being copied out come back soon
                    return budget
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

    def _reload(self, batch: ScheduledBatch, budget: int) -> int:
        """Requests on the host come back (oldest first) while blocks and the batch allow."""
        tier = self.tier
        while tier is not None and self.hosted and budget > 0:
            seq = self.hosted[0]
            n = min(seq.num_uncomputed, budget)
            if len(self.running) >= self.max_num_seqs or not self._fits(seq, seq.num_tokens):
                break
            if n > 1 and not self._prefill_fits(batch, n):
                break
            self.hosted.pop(0)
            self.blocks.append(seq.request_id, seq.num_tokens)
            tier.swap_in(seq.request_id, self.blocks)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._may_stage(seq, batch):
                self._stage(seq, batch)
                continue
            if budget <= 0 or batch.staged or (self.offload.force and self.offload.layerwise):
                return  # (a paged prefill never shares a step with staged prompts)
            shared = self._share_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            reserve = seq.num_tokens if self.whole_prompt else seq.num_computed + n
            if not self._fits(seq, reserve, self._reload_reserve()) or (
                n > 1 and not self._prefill_fits(batch, n)
            ):  # (older requests on the host come back first)
                self._unshare(seq, shared)
                return
            self._count_prefix(seq, shared)
            self.waiting.popleft()
            self.blocks.append(seq.request_id, reserve)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n

    # -- prefix caching --------------------------------------------------------------------

    def _share_prefix(self, seq: Sequence) -> int:
        """A request with no KV takes the cached blocks of its longest cached prefix; returns
        how many (its computed tokens start after them)."""
        if not seq.prefix_hashes or seq.num_computed > 0 or self.blocks.has(seq.request_id):
            return 0
        most = (seq.num_tokens - 1) // self.blocks.block_size  # at least one token computed
        shared = self.blocks.share_prefix(seq.request_id, seq.prefix_hashes[:most])
        seq.num_computed = shared * self.blocks.block_size
        seq.num_hashed_blocks = shared
        return shared

    def _unshare(self, seq: Sequence, shared: int) -> None:
        """Not admitted after all: give the shared blocks back (they stay cached)."""
        if shared:
            self.blocks.free(seq.request_id)
            seq.num_computed = seq.num_hashed_blocks = 0

    def _count_prefix(self, seq: Sequence, shared: int) -> None:
        if not seq.prefix_hashes or (shared == 0 and seq.num_computed > 0):
            return  # (caching off, or a request that kept its KV: no lookup)
        hit = shared * self.blocks.block_size
        self.prefix_queries_total += seq.num_tokens
        self.prefix_hits_total += hit
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = min(hit, seq.num_prompt_tokens)

    # -- the host tier --------------------------------------------------------------------------

    def _may_stage(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Prefill this prompt straight to the host: layerwise, a fresh prompt that does not
        fit on the device (or a forced test), room on the host; staged prompts share a step
        only with decodes and each other, up to the token budget (the first one may be
        longer: it goes in one pass)."""
        tier, policy = self.tier, self.offload
        if tier is None or not policy.layerwise or seq.num_computed > 0:
            return False
        if not (policy.force or not self._fits(seq, seq.num_tokens, self._reload_reserve())):
            return False
        staged = sum(s.num_tokens for s in batch.staged)
        if staged and staged + seq.num_tokens > self.max_num_batched_tokens:
            return False
        if self.elastic is not None and staged + seq.num_tokens > self._step_tokens:
            return False  # (the step's activations must fit the memory budget)
        if any(
            n > 1
            for s, n in zip(batch.seqs, batch.num_tokens, strict=True)
            if s not in batch.staged
        ):
            return False
        return tier.has_room(seq.num_tokens) and self._prefill_fits(batch, seq.num_tokens)

    def _stage(self, seq: Sequence, batch: ScheduledBatch) -> None:
        assert self.tier is not None
        self.waiting.popleft()
        self.tier.stage(seq.request_id, seq.num_tokens)
        seq.status = SequenceStatus.STAGING
        batch.seqs.append(seq)
        batch.num_tokens.append(seq.num_tokens)  # one pass (may exceed the token budget)
        batch.staged.append(seq)
        self.num_parked_total += 1

    def _copies_will_free(self, seq: Sequence, target: int) -> bool:
        """The blocks `seq` lacks are among those fenced by copies in flight."""
        if self.tier is None:
            return False
        need = self.blocks.blocks_needed(seq.request_id, target)
        return need <= self.blocks.num_free() + self.blocks.num_fenced()

    def _swap_pays(self, seq: Sequence) -> bool:
        """Moving the victim's KV out and back costs less than recomputing its tokens. Never
        for a victim sharing cached blocks: a copy reads only blocks fenced for it (a shared
        block, released by its other holders mid-copy, could be evicted and rewritten); that
        victim is recomputed, its shared prefix found cached again."""
        tier, policy = self.tier, self.offload
        if tier is None or seq.num_computed == 0 or not tier.has_room(seq.num_computed):
            return False
        if self.blocks.holds_shared(seq.request_id):
            return False
        speed = self.step_model.tokens_per_s()
        if policy.link_bytes_per_s <= 0 or speed <= 0:
            return True
        nbytes = self.blocks.blocks_for(seq.num_computed) * policy.block_bytes
        return 2 * nbytes / policy.link_bytes_per_s <= seq.num_computed / speed

    def _random_swap(self, batch: ScheduledBatch) -> None:
        """Tests (kv_offload_force): now and then, swap a random running request out."""
        if not self.running or self._rng.random() >= FORCED_SWAP_PROBABILITY:
            return
        victim = self.running[self._rng.randrange(len(self.running))]
        if self._swap_pays(victim):
            self.evict(victim, batch)

    def _host(self, seq: Sequence) -> None:
        self.hosted.append(seq)
        self.hosted.sort(key=lambda s: s.arrival)

    # -- helpers ----------------------------------------------------------------------------

    def _fits(self, seq: Sequence, num_tokens: int, reserved: int = 0) -> bool:
        """Blocks for `num_tokens` of `seq` are free, beyond `reserved` ones; under the
        whole-prompt rule also a block of headroom per running request (each may start a new
        block within block_size steps, and the newcomer, admitted last, would be their first
        victim)."""
        if not self.whole_prompt:
            need = self.blocks.blocks_needed(seq.request_id, num_tokens)
            return need + reserved <= self.blocks.num_free()
        need = self.blocks.blocks_needed(seq.request_id, num_tokens)
        return need + reserved + len(self.running) <= self.blocks.num_free()

    def _reload_reserve(self) -> int:
        """Blocks the oldest request on the host needs to come back (a new prompt may only
        take blocks beyond these)."""
        return self.blocks.blocks_for(self.hosted[0].num_tokens) if self.hosted else 0

    def _prefill_fits(self, batch: ScheduledBatch, n: int) -> bool:
        """SLO-aware admission: the time `n` more prefill tokens add to this step fits in the
        smallest TPOT slack of the running requests (always, with no SLO or no model yet)."""
        if self._slack == math.inf or not self.step_model.fitted:
            return True
        tokens = sum(batch.num_tokens)
        extra = self.step_model.predict(tokens + n) - self.step_model.predict(tokens)
        return extra <= self._slack

    def _min_slack(self) -> float:
        """min over decoding requests with a TPOT SLO (their own, else `tpot_slo_s`) of
        slo · (d + m) − E − m · t_step: d tokens decoded after the first, in E seconds, m
        still to come (from max_tokens), t_step a decode step; inf when none has one."""
        now = time.monotonic()
        step = self.step_model.predict(len(self.running)) if self.step_model.fitted else 0.0
        slack = math.inf
        for seq in self.running:
            slo = seq.slo.tpot_or(self.tpot_slo_s) if seq.slo is not None else self.tpot_slo_s
            if seq.first_token_at <= 0.0 or slo <= 0.0:
                continue
            done = len(seq.output_token_ids) - 1
            left = max(seq.sampling.max_tokens - len(seq.output_token_ids), 0)
            elapsed = now - seq.first_token_at
            slack = min(slack, slo * (done + left) - elapsed - left * step)
        return max(slack, 0.0) if slack != math.inf else slack

    def _take_out(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.hosted:
            self.hosted.remove(seq)

    def _release(self, seq: Sequence) -> None:
        if self.tier is None:
            self.blocks.free(seq.request_id)
        else:
            self.tier.release(seq.request_id, self.blocks)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        if self.tier is not None and self._swap_pays(seq):
            self.tier.swap_out(seq.request_id, self.blocks, seq.num_computed)
            seq.num_preemptions += 1  # (a migration copying its blocks aborts)
            seq.status = SequenceStatus.HOSTED
            self._host(seq)
            self.num_swaps_total += 1
        else:
            self._release(seq)
            self.num_tokens_recomputed_total += seq.num_computed
            seq.reset_for_recompute()
            self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions_total += 1
