"""MELL: pack requests by KV size onto as few workers as possible, with bounded migrations.

The online algorithm of Liu et al., INFOCOM 2025, §VI (digest: reference/mell_llumnix.md §1.3).

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
   touches.

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
- Prefill-aware placement (`prefill_share`, default 0.5): a worker prefills every prompt it
  admitted in an epoch before it decodes again (vLLM without chunked prefill; the simulator
  models it), so an arrival first looks among workers that have admitted less than
  `prefill_share` · C blocks of prompts since the last epoch, and only then among all. In a
  burst of long prompts (the Azure code trace) best fit would otherwise stack several prefills
  on one worker, and every request there lives that much longer. 0 turns it off.
- Requests placed within the last `settle_epochs` epochs (default 3, 1.5 s at 0.5 s epochs)
  are not moved by refills or companion pulls, and relief takes them last: a long prompt is
  still being prefilled then (C tokens take 2.5 s on the 7B/4090 profile), and most short
  requests (code completions) leave before a refill of them would pay off. On the fig11
  traces 3 instead of 1 epoch removes 10-20% of MELL's migrations at the same peaks.
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

Live use: `place` answers at once; `plan_epoch` returns moves with kind "auto" (see
`migration_choice.choose_transfers`). Moves are advice for one epoch: the next epoch re-reads the
view, so a move that was not run (deferred, failed, request finished) is simply planned again or
dropped; there is nothing to acknowledge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from mell.gateway.policy.base import (
    Arrival,
    Move,
    Placement,
    PolicyView,
    Rejection,
    WorkerInfo,
    arrival_blocks,
    register_policy,
)
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

__all__ = ["CLASS_NAMES", "FULL", "PER_LABEL", "TINY", "L", "M", "Mell", "S", "T", "size_class"]


@register_policy("mell")
class Mell:
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
        settle_epochs: int = 3,
        prefill_share: float = 0.5,
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
        self._recent: dict[str, list[list[str]]] = {}  # model -> arrivals of the last epochs
        self.headroom_tokens = headroom_tokens
        self.max_moves_per_op = max_moves_per_op
        self._pools: dict[str, _Pool] = {}
        # model -> ({request: worker}, {request: blocks}) as of the last epoch or placement
        self._seen: dict[str, tuple[dict[str, str], dict[str, int]]] = {}
        self._arrived: dict[str, list[str]] = {}  # model -> requests placed since last epoch
        self.moves_by_op: dict[str, int] = {}  # planned migrations per operation kind (stats)

    # -- contract C -------------------------------------------------------------------------

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
        wid = self._allocate_target(pool, blocks, None)
        if wid is None:
            return Rejection(f"no ACTIVE worker of model {model!r} has room for {blocks} KV blocks")
        rid = arrival.request_id
        pool.put(rid, blocks, wid)
        pool.origin[rid] = wid
        pool.admitted[wid] = pool.admitted.get(wid, 0) + blocks
        seen_where, seen_size = self._seen.setdefault(model, ({}, {}))
        seen_where[rid] = wid
        seen_size[rid] = blocks
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
        return moves

    # -- one epoch of one pool --------------------------------------------------------------

    def _plan_pool(self, model: str, workers: Iterable[WorkerInfo]) -> list[Move]:
        pool = self._pools.get(model) or self._pools.setdefault(model, _Pool())
        pool.place_epochs = self.place_epochs
        pool.rebuild(workers, self.headroom_tokens)
        pool.op_moves = []
        pool.admitted = {}
        seen_where, seen_size = self._seen.get(model, ({}, {}))
        arrived = self._arrived.pop(model, [])
        where = pool.where
        recent = self._recent.setdefault(model, [])
        recent.append(arrived)
        del recent[: max(0, len(recent) - self.settle_epochs)]
        pool.young = {rid for batch in recent for rid in batch} if self.settle_epochs else set()

        # 1. Departures: requests seen before and now gone (sorted: reproducible order).
        departed = [
            (seen_where[rid], pool.klass(seen_size[rid]))
            for rid in sorted(seen_where.keys() - where.keys() - pool.pinned.keys())
        ]
        for wid, cls in departed:
            self._op(pool, self._depart, wid, cls)
        # 2. Updates: evacuation of non-ACTIVE workers, overload, class changes.
        for rid, (_, blocks) in pool.pinned.items():
            self._op(pool, self._reallocate, rid, blocks)
        growth, caps, used, ceil = pool.growth, pool.caps, pool.used, math.ceil
        overloaded = [  # `_Pool.overloaded`, inlined: this runs on every worker every epoch
            w
            for w, its in pool.items.items()
            if used[w] + ceil(growth * len(its)) + len(its) > caps[w]
        ]
        for wid in sorted(overloaded, key=lambda w: -pool.used.get(w, 0)):
            self._op(pool, self._relieve, wid)
        klass = pool.klass
        klass(0)  # builds the lookup table
        table, top = pool._classes, len(pool._classes)
        grown: list[tuple[str, int]] = []
        old_size = seen_size.get
        for items in list(pool.items.values()):
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
        for rid, new in grown:
            if rid in where:
                self._op(pool, self._update, rid, new)
        # 3. Follow-ups of this epoch's arrivals.
        for rid in arrived:
            wid = where.get(rid)
            if wid is not None and klass(self._size(pool, rid)) == L:
                self._op(pool, self._follow_large, wid)
        # 4. Our addition: repair workers that growth, relief or a budget-cut operation left
        #    under-full (Depart repairs only the workers a departure touched).
        for wid in self._repair_candidates(pool)[: self.repairs_per_epoch]:
            self._op(pool, self._repair, wid)

        sizes: dict[str, int] = {}
        for items in pool.items.values():
            sizes.update(items)
        self._seen[model] = (dict(where), sizes)
        origin = pool.origin
        return [
            Move(rid, origin[rid], where[rid])
            for rid in pool.moved
            if rid in where and rid in origin and origin[rid] != where[rid]
        ]

    def _op(self, pool: _Pool, fn, *args) -> None:  # type: ignore[no-untyped-def]
        pool.moves_left = self.max_moves_per_op
        fn(pool, *args)
        used = self.max_moves_per_op - pool.moves_left
        pool.op_moves.append(used)
        self.moves_by_op[fn.__name__] = self.moves_by_op.get(fn.__name__, 0) + used

    @staticmethod
    def _size(pool: _Pool, rid: str) -> int:
        return pool.items[pool.where[rid]][rid]

    # -- Allocate ---------------------------------------------------------------------------

    def _allocate_target(self, pool: _Pool, blocks: int, exclude: str | None) -> str | None:
        """Where Allocate puts a new item of `blocks` (without the follow-up migrations)."""
        busy = [w for w in pool.items if w != exclude]
        if self.prefill_share > 0 and exclude is None:
            # Our addition: a worker prefills every prompt it admitted in an epoch before it
            # decodes again, so an arrival first looks among workers that have not admitted
            # `prefill_share` of C this epoch (bursts of long prompts otherwise stack their
            # prefills on one worker, and everything there lives that much longer).
            limit = self.prefill_share * pool.capacity - blocks
            admitted = pool.admitted
            calm = [w for w in busy if admitted.get(w, 0) <= limit]
            if len(calm) < len(busy):
                wid = self._busy_target(pool, blocks, calm, exclude)
                if wid is not None:
                    return wid
        wid = self._busy_target(pool, blocks, busy, exclude)
        if wid is None:
            wid = pool.activate()
        if wid is None:  # no idle worker left (fixed live pool): any busy worker that fits
            wid = pool.best_fit(busy, blocks)
        return wid

    def _busy_target(
        self, pool: _Pool, blocks: int, busy: list[str], exclude: str | None
    ) -> str | None:
        """The busy worker among `busy` that Allocate chooses for `blocks`, if any."""
        cls = pool.klass(blocks)
        wid: str | None = None
        if cls in (M, S) and self.placement != "bestfit":
            # The L+M / L+S pairing of the paper: a lone L takes an S/M companion first.
            lone_large = [
                w for w in busy if pool.label(w) == L and pool.count(w, M) + pool.count(w, S) == 0
            ]
            wid = pool.best_fit(lone_large, blocks)
        if wid is None and self.placement in ("pair", "bestfit"):
            # Best fit over every busy worker: the 3/4-full fallback below, a subset of these,
            # cannot find one when this does not.
            return pool.best_fit(busy, blocks)
        if wid is None and cls == L:
            # An L may join T items (an L-GPU with T companions is a valid packing).
            wid = pool.best_fit((w for w in busy if pool.label(w) == T), blocks)
        elif wid is None and cls in (M, S):
            newest = pool.newest(cls, exclude)
            if (
                newest is not None
                and pool.count(newest, cls) < PER_LABEL[cls]
                and pool.fits(newest, blocks)
            ):
                wid = newest
        elif wid is None:  # T and tiny: next to larger items first, then T-GPUs
            wid = pool.best_fit((w for w in busy if pool.label(w) > T), blocks)
            if wid is None:
                newest = pool.newest(T, exclude)
                if newest is not None and pool.fits(newest, blocks):
                    wid = newest
            if wid is None:
                wid = pool.best_fit((w for w in busy if pool.label(w) == T), blocks)
        if wid is None:
            # Our fallback before opening a worker: any busy worker the item makes at least 3/4
            # full (Theorem 2's "all bins 3/4 full" argument covers it; costs no migration).
            wid = pool.best_fit((w for w in busy if pool.fill_with(w, blocks) >= FULL), blocks)
        return wid

    def _reallocate(self, pool: _Pool, rid: str, blocks: int) -> bool:
        """Allocate an item that already runs somewhere (eviction, class change, drain)."""
        if pool.moves_left <= 0:
            return False
        src = pool.where.get(rid)
        wid = self._allocate_target(pool, blocks, src)
        if wid is None or wid == src:
            return False
        if src is None:  # on a DRAINING worker: it enters the plan now
            pool.moves_left -= 1
            pool.put(rid, blocks, wid)
            pool.origin[rid] = pool.pinned[rid][0]
            pool.moved[rid] = None
        elif not pool.move(rid, wid):
            return False
        if pool.klass(blocks) == L:
            self._follow_large(pool, wid)
        return True

    def _follow_large(self, pool: _Pool, wid: str) -> None:
        """After an L lands on `wid`: pull one S/M companion, then T items up to 3/4 full."""
        if pool.label(wid) != L:
            return
        if pool.count(wid, M) + pool.count(wid, S) == 0:
            self._pull_companion(pool, wid)
        if pool.fill(wid) < FULL and pool.newest(T, wid) is not None:
            self._refill_small(pool, wid)

    def _pull_companion(self, pool: _Pool, wid: str) -> None:
        """Move the largest fitting S/M item from an S/M-GPU next to the L on `wid`, then
        refill the GPU it left from the most recently activated GPU of that label."""
        room = pool.room(wid, 1)
        best: tuple[int, str, str] | None = None
        for src, lab in pool.labels.items():
            if lab not in (M, S) or src == wid:
                continue
            for rid, b in pool.items[src].items():
                if (
                    pool.klass(b) in (M, S)
                    and b <= room
                    and rid not in pool.young
                    and (best is None or b > best[0])
                ):
                    best = (b, rid, src)
        if best is None:
            return
        _, rid, src = best
        lab = pool.label(src)
        if pool.move(rid, wid) and src in pool.items:
            self._refill_class(pool, src, lab)

    def _refill_class(self, pool: _Pool, wid: str, cls: int) -> None:
        """fill(j): pull one `cls` item from the most recently activated `cls`-GPU into `wid`."""
        src = pool.newest(cls, wid)
        if src is None or pool.stamp.get(src, 0) < pool.stamp.get(wid, 0):
            return  # `wid` is itself the newest: it is the one allowed to be under-full
        if pool.fill(wid) >= FULL:
            return  # our choice: a worker 3/4 full needs no refill (Theorem 2's density case)
        room = pool.room(wid)
        cands = [
            (b, r)
            for r, b in pool.items[src].items()
            if pool.klass(b) == cls and b <= room and r not in pool.young
        ]
        if cands:
            pool.move(max(cands)[1], wid)

    def _refill_small(self, pool: _Pool, wid: str) -> None:
        """Pull T/tiny requests (largest first, one T-sized multi-item: at most C/4 in total)
        from the most recently activated T-GPU into `wid` until it is 3/4 full."""
        src = pool.newest(T, wid)
        if src is None or (pool.label(wid) == T and pool.stamp[src] < pool.stamp[wid]):
            return
        if self.refill == "drain":
            # Our variant: refill only when it empties the newest T-GPU (a worker released);
            # otherwise the move only shifts the hole to the newest worker.
            items = pool.items[src]
            if (
                len(items) <= pool.moves_left
                and all(pool.klass(b) <= T for b in items.values())
                and sum(items.values()) <= pool.room(wid, len(items))
            ):
                for rid in list(items):
                    pool.move(rid, wid)
            return
        budget = pool.capacity // 4
        for b, rid in sorted(((b, r) for r, b in pool.items[src].items()), reverse=True):
            if pool.fill(wid) >= FULL or src not in pool.items:
                break
            if b > budget or pool.klass(b) > T or rid in pool.young or not pool.fits(wid, b):
                continue
            if not pool.move(rid, wid):
                break
            budget -= b

    def _repair_candidates(self, pool: _Pool) -> list[str]:
        """Workers under 3/4 full that Theorem 1 says should not be: an L without an S/M
        companion, an M/S-GPU short of its count, a T-GPU that is not the newest. Emptiest
        first."""
        newest = {lab: pool.newest(lab) for lab in (T, S, M)}
        out = []
        for wid, lab in pool.labels.items():
            if pool.fill(wid) >= FULL or newest.get(lab) == wid:
                continue
            if lab == L and pool.count(wid, M) + pool.count(wid, S) > 0:
                continue
            if lab in (M, S) and pool.count(wid, lab) >= PER_LABEL[lab]:
                continue
            out.append(wid)
        out.sort(key=lambda w: pool.fill(w))
        return out

    def _repair(self, pool: _Pool, wid: str) -> None:
        if wid not in pool.items:
            return
        lab = pool.label(wid)
        if lab == L:
            self._pull_companion(pool, wid)
        elif lab in (M, S):
            self._refill_class(pool, wid, lab)
        if wid in pool.items and pool.fill(wid) < FULL:
            self._refill_small(pool, wid)

    # -- Depart -----------------------------------------------------------------------------

    def _depart(self, pool: _Pool, wid: str, cls: int) -> None:
        """A `cls` item left `wid` (already gone from the plan): repair the packing."""
        if wid not in pool.items:
            return  # emptied: released
        if cls == L and self._release(pool, wid):
            # Paper: evict and re-Allocate everything else, so the worker is released. Ours:
            # only when everything fits on other busy workers (moving an item onto a newly
            # opened worker would cost a migration and release nothing); otherwise the worker
            # stays, relabelled, and is repaired like any other departure below.
            return
        lab = pool.label(wid)
        if cls in (M, S):
            if lab == L:
                self._pull_companion(pool, wid)
            elif lab in (M, S):
                self._refill_class(pool, wid, cls)
        if wid in pool.items and pool.fill(wid) < FULL:
            if pool.label(wid) == T:
                newest = pool.newest(T, wid)
                if newest is not None and pool.stamp[newest] > pool.stamp[wid]:
                    self._refill_small(pool, wid)
            else:
                self._refill_small(pool, wid)

    def _release(self, pool: _Pool, wid: str) -> bool:
        """Move every request of `wid` to other busy workers (best fit, largest first) if all
        of them fit within the operation's migration budget; True when `wid` was emptied."""
        items = sorted(pool.items[wid].items(), key=lambda kv: (-kv[1], kv[0]))
        if len(items) > pool.moves_left:
            return False
        plan: list[tuple[str, str]] = []
        extra: dict[str, int] = {}
        extra_n: dict[str, int] = {}
        ceil = math.ceil
        per_request = pool.growth * pool.place_epochs
        for rid, b in items:
            best, best_r = None, 0
            for other in pool.items:
                if other == wid or other not in pool.caps:
                    continue
                n = len(pool.items[other]) + extra_n.get(other, 0)
                free = pool.caps[other] - pool.used[other] - extra.get(other, 0)
                r = free - ceil(per_request * (n + 1))
                if r >= b and (best is None or r < best_r):
                    best, best_r = other, r
            if best is None:
                return False
            plan.append((rid, best))
            extra[best] = extra.get(best, 0) + b
            extra_n[best] = extra_n.get(best, 0) + 1
        for rid, dst in plan:
            pool.move(rid, dst)
        return True

    # -- Update -----------------------------------------------------------------------------

    def _update(self, pool: _Pool, rid: str, new: int) -> None:
        """`rid` grew into class `new` (T→S, S→M, →L)."""
        wid = pool.where[rid]
        if new == L:
            self._relieve(pool, wid)
            return
        lab = pool.label(wid)
        companions = pool.count(wid, M) + pool.count(wid, S)
        if lab == L and companions <= 1:
            return  # the L-GPU's one S/M companion: still a valid packing
        if pool.fill(wid) >= FULL:
            # Our choice: a worker at least 3/4 full already meets Theorem 2's density argument,
            # so its structure does not need repair; moving the item would only cost a migration.
            return
        # Paper: Depart then Allocate.
        if self._reallocate(pool, rid, pool.items[wid][rid]):
            self._depart(pool, wid, new)

    def _relieve(self, pool: _Pool, wid: str) -> None:
        """Overflow fallback (the paper covers only L growth): when the worker cannot absorb one
        more epoch of growth, evict one item and re-Allocate it elsewhere.

        Our choice: the smallest item that alone restores the full placement headroom (so the
        worker does not overflow again next epoch: one move instead of a move per epoch),
        else the largest item that is not the worker's largest (which keeps the worker's
        label), and repeat; settled requests before ones placed within `settle_epochs`. Never
        the worker's last item."""
        while wid in pool.items and len(pool.items[wid]) > 1 and pool.overloaded(wid):
            items = pool.items[wid]
            keep = max(items, key=lambda r: (items[r], r))
            deficit = -pool.room(wid, -1)  # headroom missing once one request has left
            # Settled requests first: a request still in its first epochs is being prefilled.
            settled = sorted((b, r) for r, b in items.items() if r != keep and r not in pool.young)
            fresh = sorted((b, r) for r, b in items.items() if r != keep and r in pool.young)
            choice = next((x for x in settled + fresh if x[0] >= deficit), (settled or fresh)[-1])
            if not self._reallocate(pool, choice[1], choice[0]):
                return
