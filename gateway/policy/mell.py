"""MELL: pack requests by KV size onto as few workers as possible, with bounded migrations.

The online algorithm of Liu et al., INFOCOM 2025, §VI (arXiv 2501.06709).

Sizes are current KV blocks; C is a worker's capacity. Classes: L (C/2, C], M (C/3, C/2],
S (C/4, C/3], T (C/8, C/4] and tiny (≤ C/8). A worker is labelled by the largest class it holds
(tiny counts as T). "Most recently activated worker of a label" is the paper's open bin: refills
pull from it, so that only the newest bin of each label is under-full.

One `_Pool` per model holds the *planned* packing: the truth read from the view at the start of
an epoch, plus the placements and moves decided since. `plan_epoch` rebuilds it from the view (the
view is the truth: departed requests, lost workers and unknown requests are all handled by that
rebuild), then runs the epoch's operations in the paper's batching order into one move buffer:

1. Depart for every request that vanished since the last epoch (refills);
2. Update for growth: evacuation of non-ACTIVE (DRAINING) workers, overload (a worker that
   cannot absorb one more epoch of growth), class changes (T→S, S→M, →L);
3. the follow-ups of this epoch's Allocates (arrivals were placed at once by `place`; an L
   arrival pulls an S/M companion and T fill into its worker here);
4. (ours) repair of up to `repairs_per_epoch` under-full workers that Theorem 1 says should not
   be (a lone L, an M/S-GPU short of its count, a T-GPU that is not the newest), emptiest
   first: growth, relief and the per-operation move cap leave such workers that no departure
   touches;
5. (ours) consolidation: when the pool is fragmented (more busy workers than
   ⌈Σ KV / C · (1 + `consolidate_slack`)⌉), the emptiest workers under 3/4 full are emptied
   into the other workers' gaps (best fit, largest request first), each only if all its
   requests fit within one operation's 10 moves, up to `consolidate` workers freed and
   `consolidate_tries` tried per epoch, none that took requests this epoch, and none holding
   a young request (below). Every move of it frees a worker; the paper's refills only keep the
   newest bin the under-full one, and after a burst of arrivals and departures several workers
   stay partly empty that no refill empties (on the bench/fig11.py traces: peak over KV at the
   peak 1.144 -> 1.120 on average over the runs at 0.9x and 1.1x their time scales, at 3% more
   migrations together with the longer settling below).

The buffer is pruned by construction: a move is (where the truth has it) → (where the plan has
it), so A→B then B→C is A→C, A→B→A is nothing, and a departed request has no move.

Choices where the paper is silent (each also noted where it is made):
- Growth headroom: a worker "fits" an item only if, afterwards, every request on it can still
  grow `headroom_tokens` per epoch for `place_epochs` epochs (default 2). Relief starts only when
  one more epoch would overflow, so a placement is not undone at the next epoch (hysteresis).
- Overflow fallback (growth of small items on a full worker, which Fig. 10 does not cover):
  evict the smallest item that alone restores the placement headroom (else the largest that is
  not the worker's own largest) and re-Allocate it; never the worker's last item. One move
  instead of one per epoch; the item defining the worker's label stays.
- Placement (`placement="bestfit"`, default): every class goes to the fullest worker that fits
  (best fit), and a new worker is opened only when none fits; the L+M / L+S pairing of the
  paper is left to the epoch's companion pulls and repairs. `placement="pair"` first puts an
  S/M arrival beside a lone L. `placement="paper"` follows Fig. 10 literally (L on a new worker
  or beside T items, S/M on the newest S/M-GPU of their class, T on L/M/S-GPUs then the newest
  T-GPU). On the Azure traces (bench/fig11.py settings) the literal rule reaches about the same
  peak but a 2-3% higher time-average and 20-25% more migrations: placing is free, while the
  class segregation has to be bought back with refills; "pair" and "bestfit" are within a
  worker or two of each other (the pairing often places an S/M beside an L that is itself
  still being prefilled).
- Prefill-aware placement (`prefill_share`, off by default): a worker computes the prompts
  queued on it one after another (chunked prefill under a per-step token budget, oldest first:
  the engine's scheduler, which the simulator models), so with `prefill_share` > 0 an arrival
  first looks among workers that have admitted less than `prefill_share` · C blocks of prompts
  since the last epoch, and only then among all. Measured on the bench/fig11.py runs at 0.8x
  to 1.2x their time scales (54 runs), it does not pay: MELL's peak over the bound averages
  1.352 with 0.5 and 1.345 without (0.25: worse; a leaky bucket draining one worker's chunk
  rate per epoch instead of the per-epoch reset, at 0.1-0.5 of C: no better), the same
  time-average. At the peak of the Azure code trace (7B) 49 of 62 workers hold a prompt
  queue, the longest 2.5 s being one prompt of a whole worker's KV: the queues are single
  long prompts, each computed at one worker's rate, which placement cannot spread.
- Requests placed, or moved by a migration that ran, within the last `settle_epochs` epochs
  (default 5, 2.5 s at 0.5 s epochs), and requests placed by this policy that have not grown
  by `settle_blocks` (default 2) KV blocks since, are young: refills, companion pulls and
  consolidation do not move them, and relief takes them last. A long prompt is still being
  prefilled then (C tokens take 2.6 s on the 7B/4090 profile), and most short requests (code
  completions) leave before a move of them would pay off: on the Azure code trace (7B) a third
  of the requests MELL moved with the 5-epoch rule alone finished within a second of the move.
  The growth rule waits for decoding to have started, however long the prompt queued; with
  both rules and consolidation MELL migrates 0.55/s on that run (0.66/s with 3 epochs and no
  consolidation; LB 0.59/s).
- Last resort (a fixed pool, every worker busy, none fits with its growth headroom, which a
  simulated pool never reaches: it always has an idle worker): the worker that reports the
  most free blocks, if they hold the prompt. A request admitted now may have to be relieved
  or preempted later; a 503 now is certain, and a live MELL refused 2.5x as many requests as
  worst-fit (no headroom) on a saturated 4-worker replay before this.
- L departure: the paper evicts and re-Allocates everything else so the worker is released; we
  do that only when everything fits on other busy workers (moving onto a newly opened worker
  would cost migrations and release nothing); otherwise the worker is repaired like any other.
- Priorities: "higher priority" = the fullest worker that still fits (best fit), ties by fewer
  requests; the objective is packing, and best fit leaves the largest holes elsewhere.
- Before opening a worker, an item may also go to any busy worker it makes at least 3/4 full.
- Class changes and refills leave a worker alone when it is at least 3/4 full: Theorem 2's
  "every bin 3/4 full" argument already covers it, and a move would only cost a migration.
- Tiny requests are not tracked as explicit bundles: a refill moves tiny/T requests largest first
  up to C/4 in total, which is exactly one T-sized multi-item per refill (`refill="drain"`
  instead refills only when that empties the newest T-GPU: half the migrations, looser packing).
- At most `max_moves_per_op` (10, Theorem 3) request migrations per operation; an operation that
  would need more stops there (the rest is repaired by later epochs).
- When no idle worker is left to activate (a fixed live pool), an item that needs a new worker
  goes to the best-fitting busy worker instead, or stays where it is.
- Capacity C for the class thresholds is the largest capacity in the pool; fits use each
  worker's own capacity (and the smaller of the planned and the reported free blocks).

- Prefix caching (`prefix_aware`, off by default): an arrival first goes to the busy worker
  holding the longest cached prefix of its prompt (`base.prefix_hits`) where it fits, sized
  there by the blocks it does not share with that worker's running requests; only then does
  Allocate choose as above, and a worker it opens is the idle one holding the longest
  prefix. Moves are planned with the sizes the view reports (shared blocks counted once, by
  their first holder).

Live use: `place` answers at once; `plan_epoch` returns moves with kind "auto" (see
`migration_choice.choose_transfers`). Moves are advice for one epoch: the next epoch re-reads the
view, so a move that was not run (deferred, failed, request finished) is simply planned again or
dropped; there is nothing to acknowledge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Concatenate, ParamSpec, TypeVar

from mell.gateway.policy.base import (
    Arrival,
    Move,
    Placement,
    PolicyView,
    PrefixHit,
    Rejection,
    WorkerInfo,
    arrival_blocks,
    longest_prefix_first,
    prefix_hits,
    register_policy,
)
from mell.gateway.policy.operations import MellOperations
from mell.gateway.policy.packing import (
    CLASS_NAMES,
    FULL,
    PER_LABEL,
    TINY,
    L,
    M,
    S,
    T,
    size_class,
)
from mell.gateway.policy.packing import Packing as _Pool

_P = ParamSpec("_P")
_R = TypeVar("_R")

__all__ = ["CLASS_NAMES", "FULL", "PER_LABEL", "TINY", "L", "M", "Mell", "S", "T", "size_class"]


@register_policy("mell")
class Mell(MellOperations):
    """The MELL packing policy (see the module docstring)."""

    name = "mell"

    def __init__(
        self,
        headroom_tokens: int = 16,
        max_moves_per_op: int = 10,
        placement: str = "bestfit",
        place_epochs: float = 2.0,
        repairs_per_epoch: int = 4,
        refill: str = "fill",
        settle_epochs: int = 5,
        prefill_share: float = 0.0,
        consolidate: int = 4,
        consolidate_tries: int = 8,
        consolidate_young: bool = False,
        settle_blocks: int = 2,
        consolidate_slack: float = 0.05,
        prefix_aware: bool = False,
    ) -> None:
        if placement not in ("pair", "bestfit", "paper"):
            raise TypeError(f"placement must be 'pair', 'bestfit' or 'paper', not {placement!r}")
        self.placement = placement
        self.place_epochs = place_epochs
        self.repairs_per_epoch = repairs_per_epoch
        if refill not in ("fill", "drain"):
            raise TypeError(f"refill must be 'fill' or 'drain', not {refill!r}")
        self.refill = refill
        self.settle_epochs = settle_epochs
        self.prefill_share = prefill_share
        self.consolidate = consolidate
        self.consolidate_tries = consolidate_tries
        self.consolidate_young = consolidate_young
        self.settle_blocks = settle_blocks
        self.consolidate_slack = consolidate_slack
        self.prefix_aware = prefix_aware
        self._recent: dict[str, list[list[str]]] = {}  # model -> arrivals of the last epochs
        self._planned: dict[str, dict[str, str]] = {}  # model -> {request: dst} last planned
        self._born: dict[str, dict[str, int]] = {}  # model -> {request: blocks when placed}
        self.headroom_tokens = headroom_tokens
        self.max_moves_per_op = max_moves_per_op
        self._pools: dict[str, _Pool] = {}
        # model -> ({request: worker}, {request: blocks}) as of the last epoch or placement
        self._seen: dict[str, tuple[dict[str, str], dict[str, int]]] = {}
        self._arrived: dict[str, list[str]] = {}  # model -> requests placed since last epoch
        self.moves_by_op: dict[str, int] = {}  # planned migrations per operation kind (stats)

    # -- the policy contract ------------------------------------------------------------------

    def place(self, view: PolicyView, arrival: Arrival) -> Placement | Rejection:
        model = arrival.model
        workers = view.workers(model)
        if not workers:
            return Rejection(f"no worker serves model {model!r}")
        pool = self._pools.get(model) or self._pools.setdefault(model, _Pool())
        pool.place_epochs = self.place_epochs
        pool.growth = self.headroom_tokens / max(1, workers[0].block_size)
        pool.refresh_free(workers)
        if not pool.caps:
            return Rejection(f"no ACTIVE worker of model {model!r}")
        blocks = arrival_blocks(arrival, workers[0].block_size)
        pool.moves_left = 0  # placing never migrates; follow-ups run in plan_epoch
        wid = None
        if self.prefix_aware:
            hits = prefix_hits(view, arrival)
            wid, blocks = _longest_prefix(pool, hits, blocks)
            if wid is None:  # a worker to open: the idle one holding the longest prefix first
                pool.idle.sort(key=lambda w: -hits[w].tokens if w in hits else 0)
        if wid is None:
            wid = self._allocate_target(pool, blocks, None) or _roomiest(pool, blocks)
        if wid is None:
            return Rejection(f"no ACTIVE worker of model {model!r} has room for {blocks} KV blocks")
        rid = arrival.request_id
        pool.put(rid, blocks, wid)
        pool.origin[rid] = wid
        pool.admitted[wid] = pool.admitted.get(wid, 0) + blocks
        seen_where, seen_size = self._seen.setdefault(model, ({}, {}))
        seen_where[rid] = wid
        seen_size[rid] = blocks
        if self.settle_blocks:
            self._born.setdefault(model, {})[rid] = blocks
        self._arrived.setdefault(model, []).append(rid)
        return Placement(wid)

    def plan_epoch(self, view: PolicyView, now: float) -> list[Move]:
        moves: list[Move] = []
        for model in view.models():
            moves.extend(self._plan_pool(model, view.workers(model)))
        for model in list(self._pools):
            if model not in view.models():
                del self._pools[model]
                self._seen.pop(model, None)
                self._arrived.pop(model, None)
                self._planned.pop(model, None)
                self._born.pop(model, None)
        return moves

    # -- one epoch of one pool --------------------------------------------------------------

    def _plan_pool(self, model: str, workers: Iterable[WorkerInfo]) -> list[Move]:
        """One epoch of one model's pool: the truth of the view, then the module doc's five
        steps in order, then the moves from the truth to the plan."""
        pool = self._pools.get(model) or self._pools.setdefault(model, _Pool())
        pool.place_epochs = self.place_epochs
        pool.rebuild(workers, self.headroom_tokens)
        pool.op_moves = []
        pool.admitted = {}
        seen_where, seen_size = self._seen.get(model, ({}, {}))
        arrived = self._arrived.pop(model, [])
        self._mark_young(model, pool, arrived)
        self._depart_vanished(pool, seen_where, seen_size)
        self._update_for_growth(pool, seen_size)
        self._follow_arrivals(pool, arrived)
        self._repair_underfull(pool)
        self._consolidate_pool(pool)
        return self._planned_moves(model, pool)

    def _mark_young(self, model: str, pool: _Pool, arrived: list[str]) -> None:
        """`pool.young`: requests placed, or moved by a migration that ran, within the last
        `settle_epochs`; and requests placed by us that have grown by fewer than
        `settle_blocks` blocks since (adopted requests, whose placement we did not see, count
        as settled)."""
        where = pool.where
        recent = self._recent.setdefault(model, [])
        planned = self._planned.pop(model, {})
        recent.append(arrived + [rid for rid, dst in planned.items() if where.get(rid) == dst])
        del recent[: max(0, len(recent) - self.settle_epochs)]
        pool.young = {rid for batch in recent for rid in batch} if self.settle_epochs else set()
        born = self._born.get(model)
        if born:
            self._born[model] = _still_growing(pool, born, self.settle_blocks)

    def _depart_vanished(
        self, pool: _Pool, seen_where: dict[str, str], seen_size: dict[str, int]
    ) -> None:
        """Step 1, Depart: requests seen before and now gone (sorted: reproducible order)."""
        departed = [
            (seen_where[rid], pool.klass(seen_size[rid]))
            for rid in sorted(seen_where.keys() - pool.where.keys() - pool.pinned.keys())
        ]
        for wid, cls in departed:
            self._op(pool, self._depart, wid, cls)

    def _update_for_growth(self, pool: _Pool, seen_size: dict[str, int]) -> None:
        """Step 2, Update: evacuation of non-ACTIVE workers, overload, class changes."""
        for rid, (_, blocks) in pool.pinned.items():
            self._op(pool, self._reallocate, rid, blocks)
        for wid in sorted(_overloaded(pool), key=lambda w: -pool.used.get(w, 0)):
            self._op(pool, self._relieve, wid)
        for rid, new in _class_changes(pool, seen_size):
            if rid in pool.where:
                self._op(pool, self._update, rid, new)

    def _follow_arrivals(self, pool: _Pool, arrived: list[str]) -> None:
        """Step 3: the follow-ups of this epoch's arrivals (an L pulls a companion and fill)."""
        where, klass = pool.where, pool.klass
        for rid in arrived:
            wid = where.get(rid)
            if wid is not None and klass(self._size(pool, rid)) == L:
                self._op(pool, self._follow_large, wid)

    def _repair_underfull(self, pool: _Pool) -> None:
        """Step 4 (ours): repair workers that growth, relief or a budget-cut operation left
        under-full (Depart repairs only the workers a departure touched)."""
        for wid in self._repair_candidates(pool)[: self.repairs_per_epoch]:
            self._op(pool, self._repair, wid)

    def _consolidate_pool(self, pool: _Pool) -> None:
        """Step 5 (ours): when the pool is fragmented, free workers by moving all their
        requests into the others' gaps, emptiest first."""
        caps, used = pool.caps, pool.used
        if not self.consolidate or len(pool.items) <= math.ceil(
            sum(used.values()) / max(1, pool.capacity) * (1.0 + self.consolidate_slack)
        ):
            return
        receivers: set[str] = set()
        under = [w for w in pool.items if used[w] < FULL * caps[w]]
        under.sort(key=lambda w: (used[w] / caps[w], w))  # emptiest first
        freed = 0
        for wid in under[: self.consolidate_tries]:
            if self._op(pool, self._consolidate, wid, receivers):
                freed += 1
                if freed >= self.consolidate:
                    break

    def _planned_moves(self, model: str, pool: _Pool) -> list[Move]:
        """The moves from the truth to the plan; remembers the plan as the next epoch's
        `seen` (where and how large every request was) and `planned`."""
        where = pool.where
        sizes: dict[str, int] = {}
        for items in pool.items.values():
            sizes.update(items)
        self._seen[model] = (dict(where), sizes)
        origin, group = pool.origin, pool.group
        moves = [
            Move(rid, origin[rid], where[rid], group=group.get(rid, ""))
            for rid in pool.moved
            if rid in where and rid in origin and origin[rid] != where[rid]
        ]
        self._planned[model] = {m.request_id: m.dst for m in moves}
        return moves

    def _op(
        self, pool: _Pool, fn: Callable[Concatenate[_Pool, _P], _R], *args: _P.args, **kw: _P.kwargs
    ) -> _R:
        """Run one operation under the per-operation move cap; counts its moves."""
        pool.moves_left = self.max_moves_per_op
        out = fn(pool, *args, **kw)
        used = self.max_moves_per_op - pool.moves_left
        pool.op_moves.append(used)
        self.moves_by_op[fn.__name__] = self.moves_by_op.get(fn.__name__, 0) + used
        return out


def _longest_prefix(
    pool: _Pool, hits: Mapping[str, PrefixHit], blocks: int
) -> tuple[str | None, int]:
    """The busy worker of the plan holding the longest cached prefix where the arrival fits
    with the growth headroom, and the arrival's blocks there (less those it shares); (None,
    `blocks`) when none has room."""
    for wid, hit in longest_prefix_first(hits):
        if wid in pool.items:
            mine = max(1, blocks - hit.shared_blocks)
            if pool.fits(wid, mine):
                return wid, mine
    return None, blocks


def _roomiest(pool: _Pool, blocks: int) -> str | None:
    """The worker whose reported free blocks are the most, if they hold `blocks` (headroom
    ignored): the last resort of `Mell.place`."""
    wid = max(pool.view_free, key=pool.view_free.__getitem__, default=None)
    return wid if wid is not None and pool.view_free[wid] >= blocks else None


def _still_growing(pool: _Pool, born: dict[str, int], least: int) -> dict[str, int]:
    """Of the requests placed by us at `born` blocks, those still in the plan that have grown
    by fewer than `least` blocks; adds them to `pool.young` (settled or gone: forgotten)."""
    still: dict[str, int] = {}
    slow, where, items = pool.young.add, pool.where, pool.items
    for rid, b0 in born.items():
        wid = where.get(rid)
        if wid is not None and items[wid][rid] - b0 < least:
            still[rid] = b0
            slow(rid)
    return still


def _overloaded(pool: _Pool) -> list[str]:
    """Workers that cannot absorb one more epoch of growth (`Packing.overloaded`, inlined:
    this runs on every worker every epoch)."""
    growth, caps, used, ceil = pool.growth, pool.caps, pool.used, math.ceil
    return [
        w for w, its in pool.items.items() if used[w] + ceil(growth * len(its)) + len(its) > caps[w]
    ]


def _class_changes(pool: _Pool, seen_size: dict[str, int]) -> list[tuple[str, int]]:
    """(request, new class) of the requests whose class grew into S, M or L since the last
    epoch (T and tiny count as one class). A worker labelled T holds nothing above T (labels
    are the largest class): none of its requests can have grown into S, M or L."""
    table = pool.class_table()
    top = len(table)
    grown: list[tuple[str, int]] = []
    old_size, labels = seen_size.get, pool.labels
    for wid, items in list(pool.items.items()):
        if labels[wid] <= T:
            continue
        for rid, b in items.items():
            old = old_size(rid)
            if old is None or old == b:
                continue
            new = table[b] if b < top else L
            if new <= T:
                continue
            was = table[old] if old < top else L
            if new != (was if was > T else T):
                grown.append((rid, new))
    return grown
