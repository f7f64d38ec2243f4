"""MELL's operations of Fig. 10 on one pool's planned packing: Allocate, Depart, Update,
the refills and companion pulls they trigger, and our repair of under-full workers and relief
of overloaded ones. Each runs within the migration budget of its operation (`pool.moves_left`);
the epoch's batching order and the choices where the paper is silent are described in
`mell.py`, which mixes these into the policy."""

from __future__ import annotations

from mell.gateway.policy.packing import FULL, PER_LABEL, L, M, S, T
from mell.gateway.policy.packing import Packing as _Pool


class MellOperations:
    """The operations, as methods of the MELL policy (`mell.Mell`), whose options they read:
    `placement`, `prefill_share`, `refill`."""

    placement: str
    prefill_share: float
    refill: str
    consolidate_young: bool

    @staticmethod
    def _size(pool: _Pool, rid: str) -> int:
        return pool.items[pool.where[rid]][rid]

    # -- Allocate ---------------------------------------------------------------------------

    def _allocate_target(self, pool: _Pool, blocks: int, exclude: str | None) -> str | None:
        """Where Allocate puts a new item of `blocks` (without the follow-up migrations)."""
        busy = [w for w in pool.items if w != exclude]
        if self.prefill_share > 0 and exclude is None:
            # Our addition: a worker computes its queued prompts one after another, so an
            # arrival first looks among workers that have not admitted `prefill_share` of C
            # this epoch (bursts of long prompts otherwise stack their prefills on one worker,
            # and everything there lives that much longer).
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
        used, caps = pool.used, pool.caps
        out = []
        for wid, lab in pool.labels.items():
            if used[wid] >= FULL * caps[wid] or newest.get(lab) == wid:  # `fill`, inlined
                continue
            if lab == L and pool.count(wid, M) + pool.count(wid, S) > 0:
                continue
            if lab in (M, S) and pool.count(wid, lab) >= PER_LABEL[lab]:
                continue
            out.append(wid)
        out.sort(key=lambda w: used[w] / caps[w])
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

    def _release(self, pool: _Pool, wid: str, receivers: set[str] | None = None) -> bool:
        """Move every request of `wid` to other busy workers (best fit, largest first) if all
        of them fit within the operation's migration budget; True when `wid` was emptied.
        The workers that took one are added to `receivers`."""
        items = sorted(pool.items[wid].items(), key=lambda kv: (-kv[1], kv[0]))
        if len(items) > pool.moves_left:
            return False
        plan: list[tuple[str, str]] = []
        extra: dict[str, int] = {}
        extra_n: dict[str, int] = {}
        caps, room = pool.caps, pool.room
        for rid, b in items:
            best, best_r = None, 0
            for other in pool.items:
                if other == wid or other not in caps:
                    continue
                r = room(other, extra_n.get(other, 0) + 1) - extra.get(other, 0)
                if r >= b and (best is None or r < best_r):
                    best, best_r = other, r
            if best is None:
                return False
            plan.append((rid, best))
            extra[best] = extra.get(best, 0) + b
            extra_n[best] = extra_n.get(best, 0) + 1
        for rid, dst in plan:
            pool.move(rid, dst)
            pool.group[rid] = f"empty:{wid}"  # emptied only if every one of them runs
        if receivers is not None:
            receivers.update(extra)
        return True

    # -- Consolidate (ours) -----------------------------------------------------------------

    def _consolidate(self, pool: _Pool, wid: str, receivers: set[str]) -> bool:
        """Empty `wid` into the other workers' gaps, if all its requests fit there within one
        operation's migration budget; True when it was freed. `receivers` (workers that took
        requests this epoch) are not emptied."""
        if wid in receivers or wid not in pool.items:
            return False
        used = pool.used
        items = pool.items[wid]
        if not self.consolidate_young and any(r in pool.young for r in items):
            return False
        if len(items) > pool.moves_left:
            return False
        # A quick rejection before `_release`'s search: the largest request needs one gap, and
        # all of them together the sum of the gaps.
        widest = total = 0
        for w in pool.items:
            gap = pool.room(w)
            if gap > 0 and w != wid:
                total += gap
                if gap > widest:
                    widest = gap
        if widest < max(items.values()) or total < used[wid]:
            return False
        return self._release(pool, wid, receivers)

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
