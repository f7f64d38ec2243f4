"""The planned packing of one model's workers, as MELL sees it (`mell.gateway.policy.mell`).

Request classes by current KV blocks against the capacity C: L (C/2, C], M (C/3, C/2],
S (C/4, C/3], T (C/8, C/4], tiny (<= C/8); workers labelled by their largest class; the
activation order ("most recently activated worker of a label" is the paper's open bin); the
growth headroom a placement must leave; and the moves planned this epoch. The algorithm that
decides lives in `mell.py`; this module only keeps the books.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from mell.gateway.policy.base import WorkerInfo, WorkerStatus

TINY, T, S, M, L = 0, 1, 2, 3, 4
_ACTIVE = WorkerStatus.ACTIVE
CLASS_NAMES = {TINY: "tiny", T: "T", S: "S", M: "M", L: "L"}
FULL = 0.75  # Theorem 1: T-GPUs, and L/M-GPUs while T-GPUs exist, are at least 3/4 full
PER_LABEL = {M: 2, S: 3}  # an M-GPU holds two M items, an S-GPU three S items


def size_class(blocks: int, capacity: int) -> int:
    """The class of a request of `blocks` KV blocks on workers of `capacity` blocks."""
    if 2 * blocks > capacity:
        return L
    if 3 * blocks > capacity:
        return M
    if 4 * blocks > capacity:
        return S
    if 8 * blocks > capacity:
        return T
    return TINY


class Packing:
    """The planned packing of one model's workers."""

    def __init__(self) -> None:
        self.capacity = 0  # class thresholds: the largest worker capacity of the pool
        self.growth = 0.0  # blocks one request grows per epoch (headroom_tokens / block size)
        self.place_epochs = 2.0  # placements leave room for this many epochs of growth
        self.caps: dict[str, int] = {}  # ACTIVE worker -> capacity blocks
        self.view_free: dict[str, int] = {}  # worker -> free blocks as the view reports them
        self.items: dict[str, dict[str, int]] = {}  # ACTIVE busy worker -> {request: blocks}
        self.used: dict[str, int] = {}
        self.where: dict[str, str] = {}  # request -> planned worker
        self.origin: dict[str, str] = {}  # request -> worker the truth has it on
        self.labels: dict[str, int] = {}  # busy worker -> label
        self.stamp: dict[str, int] = {}  # busy worker -> activation order
        self.idle: list[str] = []  # ACTIVE workers free to activate
        self.released: set[str] = set()  # emptied this epoch: not reused before the moves run
        self.pinned: dict[str, tuple[str, int]] = {}  # request on a non-ACTIVE worker
        self.moved: dict[str, None] = {}  # requests the plan moved this epoch (ordered set)
        self.group: dict[str, str] = {}  # moved request -> its all-or-none group (`Move.group`)
        self.young: set[str] = set()  # placed within `settle_epochs`: refills leave them alone
        self.admitted: dict[str, int] = {}  # worker -> prompt blocks placed on it since the epoch
        self.clock = 0
        self._newest: dict[int, str | None] = {}  # label -> newest worker (cleared on changes)
        self._classes: list[int] = []  # class of every size up to capacity (a lookup table)
        self.moves_left = 0  # migrations still allowed in the current operation
        self.op_moves: list[int] = []  # migrations per operation in the last epoch (for tests)

    # -- reading the view -------------------------------------------------------------------

    def rebuild(self, workers: Iterable[WorkerInfo], headroom_tokens: int) -> None:
        """Make the plan equal to the truth of the view; keep the activation order."""
        old_stamp = self.stamp
        self._newest = {}
        self.caps, self.view_free, self.items, self.used = {}, {}, {}, {}
        self.where, self.origin, self.labels, self.stamp = {}, {}, {}, {}
        self.idle, self.released, self.pinned = [], set(), {}
        fresh: list[str] = []
        caps, items, used, where, labels = self.caps, self.items, self.used, self.where, self.labels
        stamp, idle = self.stamp, self.idle
        for w in workers:
            if w.status is not _ACTIVE and w.status != _ACTIVE:
                for rid, blocks in w.request_blocks.items():
                    self.pinned[rid] = (w.worker_id, blocks)
                continue
            wid = w.worker_id
            caps[wid] = cap = w.capacity_blocks
            if cap > self.capacity:
                self.capacity = cap
            reqs = w.request_blocks
            if not reqs:
                idle.append(wid)
                continue
            items[wid] = mine = dict(reqs)
            used[wid] = sum(mine.values())
            where.update(dict.fromkeys(mine, wid))
            labels[wid] = max(mine.values())  # a size for now: a class below

            if wid in old_stamp:
                stamp[wid] = old_stamp[wid]
            else:
                fresh.append(wid)
        self.klass(0)  # (re)builds the class table for this capacity
        table, size_limit = self._classes, len(self._classes)
        for wid, top in labels.items():
            cls = table[top] if top < size_limit else L
            labels[wid] = cls if cls > T else T
        if caps:
            self.growth = headroom_tokens / max(1, next(iter(workers)).block_size)
        for wid in sorted(fresh):  # adopted busy workers: newest after the known ones
            self.clock += 1
            self.stamp[wid] = self.clock
        self.origin = dict(self.where)
        self.moved = {}
        self.group = {}

    def refresh_free(self, workers: Iterable[WorkerInfo]) -> None:
        """Between epochs: take the view's free blocks and idle workers; adopt unknown ones."""
        caps: dict[str, int] = {}
        view_free: dict[str, int] = {}
        idle: list[str] = []
        adopt: list[WorkerInfo] = []
        items, released = self.items, self.released
        top = self.capacity
        for w in workers:  # one pass: this runs before every placement
            if w.status is not _ACTIVE and w.status != _ACTIVE:
                continue
            wid = w.worker_id
            caps[wid] = cap = w.capacity_blocks
            if cap > top:
                top = cap
            view_free[wid] = w.num_free_blocks
            if wid not in items:
                if w.request_blocks:
                    adopt.append(w)
                elif wid not in released:
                    idle.append(wid)
        self.caps, self.view_free, self.idle, self.capacity = caps, view_free, idle, top
        for w in adopt:
            wid = w.worker_id
            # busy in the view, unknown to the plan: adopt it
            self.items[wid] = dict(w.request_blocks)
            self.used[wid] = sum(w.request_blocks.values())
            for rid in w.request_blocks:
                self.where[rid] = self.origin[rid] = wid
            self._relabel(wid)
            self.clock += 1
            self.stamp[wid] = self.clock
            self._newest = {}
        for wid in [w for w in self.items if w not in self.caps]:  # no longer ACTIVE
            for rid in self.items[wid]:
                self.where.pop(rid, None)
            self._forget(wid)

    # -- the packing ------------------------------------------------------------------------

    def class_table(self) -> list[int]:
        """The class of every size from 0 to `capacity` blocks (index: blocks), built for the
        current capacity; a size above it is L."""
        self.klass(0)
        return self._classes

    def klass(self, blocks: int) -> int:
        table = self._classes
        if len(table) != self.capacity + 1:
            table = self._classes = [size_class(b, self.capacity) for b in range(self.capacity + 1)]
        return table[blocks] if 0 <= blocks <= self.capacity else L

    def _relabel(self, wid: str) -> None:
        items = self.items.get(wid)
        if not items:
            self._forget(wid)
            return
        top = max(items.values())
        old = self.labels.get(wid)
        self.labels[wid] = new = max(T, self.klass(top))
        if new != old:
            self._label_changed(wid, old, new)

    def _label_changed(self, wid: str, old: int | None, new: int | None) -> None:
        """Keep the newest-of-label cache true after `wid` went from label `old` to `new`."""
        cache = self._newest
        if old is not None and old in cache and cache[old] == wid:
            del cache[old]  # the next newest of `old` is found by a scan
        if new is not None and new in cache:
            cur = cache[new]
            if cur is None or self.stamp.get(wid, 0) > self.stamp.get(cur, 0):
                cache[new] = wid

    def _forget(self, wid: str) -> None:
        self.items.pop(wid, None)
        self.used.pop(wid, None)
        old = self.labels.pop(wid, None)
        if old is not None:
            self._label_changed(wid, old, None)
        if self.stamp.pop(wid, None) is not None:
            self.released.add(wid)

    def label(self, wid: str) -> int:
        return self.labels.get(wid, -1)

    def count(self, wid: str, cls: int) -> int:
        return sum(1 for b in self.items.get(wid, {}).values() if self.klass(b) == cls)

    def room(self, wid: str, extra_requests: int = 1) -> int:
        """Blocks an item may take on `wid` so that everyone on it can still grow for
        `place_epochs` epochs."""
        n = len(self.items.get(wid, ())) + extra_requests
        free = self.caps[wid] - self.used.get(wid, 0)
        free = min(free, self.view_free.get(wid, free))
        return free - math.ceil(self.growth * self.place_epochs * n)

    def overloaded(self, wid: str) -> bool:
        """The worker cannot absorb one more epoch of growth (+1 block per request for block
        boundaries): it would preempt before the next epoch."""
        n = len(self.items.get(wid, ()))
        need = self.used.get(wid, 0) + math.ceil(self.growth * n) + n
        return need > self.caps[wid]

    def fits(self, wid: str, blocks: int) -> bool:
        return wid in self.caps and self.room(wid) >= blocks

    def fill(self, wid: str) -> float:
        return self.used.get(wid, 0) / self.caps[wid]

    def fill_with(self, wid: str, blocks: int) -> float:
        return (self.used.get(wid, 0) + blocks) / self.caps[wid]

    def newest(self, label: int, exclude: str | None = None) -> str | None:
        """The most recently activated worker of `label` (other than `exclude`)."""
        cache = self._newest
        if label in cache:
            best = cache[label]
        else:
            best = cache[label] = self._scan_newest(label, None)
        if best is not None and best == exclude:
            return self._scan_newest(label, exclude)
        return best

    def _scan_newest(self, label: int, exclude: str | None) -> str | None:
        best, best_stamp = None, -1
        for wid, lab in self.labels.items():
            if lab == label and wid != exclude and self.stamp.get(wid, 0) > best_stamp:
                best, best_stamp = wid, self.stamp.get(wid, 0)
        return best

    def best_fit(self, candidates: Iterable[str], blocks: int) -> str | None:
        """The fullest candidate that fits `blocks` (priority: best fit, then fewer requests)."""
        best, best_r, best_n = None, 0, 0
        caps, used, items, view_free = self.caps, self.used, self.items, self.view_free
        per_request = self.growth * self.place_epochs
        ceil = math.ceil
        for wid in candidates:  # busy workers of the plan: in caps, items and used
            its = items.get(wid)
            if its:
                n = len(its)
                free = caps[wid] - used[wid]
            else:
                cap = caps.get(wid)
                if cap is None:
                    continue
                n, free = 0, cap
            if view_free:
                v = view_free.get(wid, free)
                if v < free:
                    free = v
            if free < blocks:
                continue  # (r <= free: a quick rejection)
            r = free - ceil(per_request * (n + 1))
            if r < blocks:
                continue
            if best is None or r < best_r or (r == best_r and n < best_n):
                best, best_r, best_n = wid, r, n
        return best

    def activate(self) -> str | None:
        while self.idle:
            wid = self.idle.pop(0)
            if wid in self.caps and wid not in self.items:
                self.clock += 1
                self.stamp[wid] = self.clock  # (no label yet: no newest-of-label changes)
                return wid
        return None

    def put(self, rid: str, blocks: int, wid: str) -> None:
        items = self.items.setdefault(wid, {})
        items[rid] = blocks
        self.used[wid] = self.used.get(wid, 0) + blocks
        self.where[rid] = wid
        if wid not in self.stamp:  # (not labelled yet: the label below updates the cache)
            self.clock += 1
            self.stamp[wid] = self.clock
        self.released.discard(wid)
        cls = max(T, self.klass(blocks))
        old = self.labels.get(wid)
        if old is None or cls > old:
            self.labels[wid] = cls
            self._label_changed(wid, old, cls)

    def take(self, rid: str) -> tuple[str, int]:
        wid = self.where.pop(rid)
        blocks = self.items[wid].pop(rid)
        self.used[wid] -= blocks
        if not self.items[wid] or max(T, self.klass(blocks)) >= self.labels.get(wid, -1):
            self._relabel(wid)
        return wid, blocks

    def move(self, rid: str, dst: str) -> bool:
        """Plan one migration; False when the operation's migration budget is spent."""
        if self.moves_left <= 0:
            return False
        self.moves_left -= 1
        _, blocks = self.take(rid)
        self.put(rid, blocks, dst)
        self.moved[rid] = None
        return True
