"""Baselines behind the policy contract (`base.Policy`): least-loaded, round-robin, best-fit,
worst-fit, lb.

Every consolidating baseline (round-robin, best-fit, worst-fit, lb) does what the MELL paper's
baselines do (§VIII): choose among the *busy* workers (ACTIVE, holding at least one request) and
"activate" an idle ACTIVE worker only when no busy one has room. least-loaded is the plain
spreading policy of a fixed pool: every ACTIVE worker is a candidate.

best-fit and worst-fit take `prefix_aware`: an arrival first goes to the busy worker holding
the longest cached prefix of its prompt (`base.prefix_hits`) that has room for it (its blocks
less those shared there, plus the growth reserve), and a worker they open is the idle one
holding the longest prefix. least-loaded with `prefix_aware` counts a worker's cached prefix
blocks of the arrival as free blocks there; the others ignore prefix caches.

Only lb migrates (Llumnix's load balancing): freeness = free blocks / batch size, the least free
workers paired with the most free ones, the shortest request of each source moved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mell.gateway.policy.base import (
    Arrival,
    Move,
    Placement,
    PolicyView,
    PrefixHit,
    Rejection,
    WorkerInfo,
    active_workers,
    arrival_blocks,
    free_blocks,
    longest_prefix_first,
    prefix_hits,
    register_policy,
)


def _no_room(arrival: Arrival, need: int) -> Rejection:
    return Rejection(
        f"no ACTIVE worker of model {arrival.model!r} has {need} free KV blocks "
        f"for a {arrival.num_prompt_tokens}-token prompt"
    )


def _need(view: PolicyView, arrival: Arrival) -> tuple[list[WorkerInfo], int]:
    workers = active_workers(view, arrival.model)
    block_size = workers[0].block_size if workers else 16
    return workers, arrival_blocks(arrival, block_size)


def reserve(worker: WorkerInfo, headroom_tokens: int, place_epochs: float = 2.0) -> int:
    """Blocks kept free on `worker` after one more placement so that every request on it can
    grow `headroom_tokens` per epoch for `place_epochs` epochs (the same rule MELL uses)."""
    if headroom_tokens <= 0:
        return 0
    n = len(worker.request_blocks) + 1
    return math.ceil(headroom_tokens / worker.block_size * place_epochs * n)


def _first_idle(workers: list[WorkerInfo], need: int) -> WorkerInfo | None:
    for w in workers:
        if not w.request_blocks and free_blocks(w) >= need:
            return w
    return None


def _longest_prefix(
    hits: Mapping[str, PrefixHit], workers: list[WorkerInfo], need: int, per_request: float
) -> WorkerInfo | None:
    """The busy worker holding the longest cached prefix of an arrival of `need` blocks that
    has room for it (the blocks shared there are not needed again) and for the growth reserve
    of `per_request` blocks per request, if any."""
    if not hits:
        return None
    by_id = {w.worker_id: w for w in workers if w.request_blocks}
    for wid, hit in longest_prefix_first(hits):
        w = by_id.get(wid)
        if w is None:
            continue
        blocks = max(1, need - hit.shared_blocks)
        keep = math.ceil(per_request * (len(w.request_blocks) + 1))
        if w.num_free_blocks >= blocks + keep:
            return w
    return None


def _by_prefix(workers: list[WorkerInfo], hits: Mapping[str, PrefixHit]) -> list[WorkerInfo]:
    """The workers holding a cached prefix, the longest first."""
    by_id = {w.worker_id: w for w in workers}
    return [by_id[wid] for wid, _ in longest_prefix_first(hits) if wid in by_id]


@register_policy("least-loaded")
class LeastLoaded:
    """Place on the ACTIVE worker with the most free KV blocks; never migrate. With
    `prefix_aware`, the blocks of the arrival's prefix a worker has cached count as free
    there too (they are work and room it need not spend): a long cached history outweighs a
    small imbalance, a shared system prompt only a little."""

    name = "least-loaded"

    def __init__(self, prefix_aware: bool = False) -> None:
        self.prefix_aware = prefix_aware

    def place(self, view: PolicyView, arrival: Arrival) -> Placement | Rejection:
        workers, need = _need(view, arrival)
        hits = prefix_hits(view, arrival) if self.prefix_aware else {}
        best: WorkerInfo | None = None
        best_score = -1
        for w in workers:
            free = free_blocks(w)
            hit = hits.get(w.worker_id)
            score = free + (hit.tokens // w.block_size if hit is not None else 0)
            if free >= need and score > best_score:
                best, best_score = w, score
        return Placement(best.worker_id) if best else _no_room(arrival, need)

    def plan_epoch(self, view: PolicyView, now: float) -> list[Move]:
        return []


class _FitPolicy:
    """Pick among busy workers by a score (lowest wins); else the first idle worker."""

    name = "fit"

    def __init__(
        self, headroom_tokens: int = 0, place_epochs: float = 2.0, prefix_aware: bool = False
    ) -> None:
        self.headroom_tokens = headroom_tokens
        self.place_epochs = place_epochs
        self.prefix_aware = prefix_aware

    def _score(self, worker: WorkerInfo, free: int) -> float:
        raise NotImplementedError

    def place(self, view: PolicyView, arrival: Arrival) -> Placement | Rejection:
        workers, need = _need(view, arrival)
        best: WorkerInfo | None = None
        best_score = 0.0
        per_request = 0.0
        if self.headroom_tokens > 0 and workers:
            per_request = self.headroom_tokens / workers[0].block_size * self.place_epochs
        hits: Mapping[str, PrefixHit] = {}
        if self.prefix_aware:
            hits = prefix_hits(view, arrival)
            cached = _longest_prefix(hits, workers, need, per_request)
            if cached is not None:
                return Placement(cached.worker_id)
        score = self._score
        for w in workers:
            blocks = w.request_blocks
            if not blocks:
                continue
            free = w.num_free_blocks
            if free < need or free < need + math.ceil(per_request * (len(blocks) + 1)):
                continue
            s = score(w, free)
            if best is None or s < best_score:
                best, best_score = w, s
        if best is None and hits:  # open the idle worker holding the longest prefix
            best = _first_idle(_by_prefix(workers, hits), need)
        if best is None:
            best = _first_idle(workers, need)
        return Placement(best.worker_id) if best else _no_room(arrival, need)

    def plan_epoch(self, view: PolicyView, now: float) -> list[Move]:
        return []


@register_policy("best-fit")
class BestFit(_FitPolicy):
    """The busy worker with the fewest free blocks that still fits; no migration."""

    name = "best-fit"

    def _score(self, worker: WorkerInfo, free: int) -> float:
        return free


@register_policy("worst-fit")
class WorstFit(_FitPolicy):
    """The busy worker with the most free blocks; no migration."""

    name = "worst-fit"

    def _score(self, worker: WorkerInfo, free: int) -> float:
        return -free


@register_policy("round-robin")
class RoundRobin:
    """Busy workers in turn (by id), skipping those without room; else an idle worker."""

    name = "round-robin"

    def __init__(self, headroom_tokens: int = 0, place_epochs: float = 2.0) -> None:
        self.headroom_tokens = headroom_tokens
        self.place_epochs = place_epochs
        self._last: dict[str, str] = {}  # model -> worker id placed last

    def place(self, view: PolicyView, arrival: Arrival) -> Placement | Rejection:
        workers, need = _need(view, arrival)
        busy = sorted((w for w in workers if w.request_blocks), key=lambda w: w.worker_id)
        last = self._last.get(arrival.model, "")
        after = [w for w in busy if w.worker_id > last] + [w for w in busy if w.worker_id <= last]
        chosen = next(
            (
                w
                for w in after
                if free_blocks(w) >= need + reserve(w, self.headroom_tokens, self.place_epochs)
            ),
            None,
        )
        if chosen is None:
            chosen = _first_idle(workers, need)
        if chosen is None:
            return _no_room(arrival, need)
        self._last[arrival.model] = chosen.worker_id
        return Placement(chosen.worker_id)

    def plan_epoch(self, view: PolicyView, now: float) -> list[Move]:
        return []


def _first(pair: tuple[float, WorkerInfo]) -> float:
    return pair[0]


def freeness(worker: WorkerInfo) -> float:
    """Llumnix's freeness: free blocks per running request (inf for an idle worker)."""
    n = len(worker.request_blocks)
    return free_blocks(worker) / n if n else float("inf")


@register_policy("lb")
class LoadBalance:
    """Llumnix-style load balancing (the MELL paper's LB baseline).

    Dispatch: the busy worker with the highest freeness (free blocks / batch size) that fits,
    else an idle worker (worst-fit by freeness).
    Every epoch, per model: busy workers sorted by freeness; the least free are paired with the
    most free (sources below the pool's mean freeness, destinations above it, zipped); each pair
    moves the source's shortest request (Llumnix's default `SR` selection) when that shrinks the
    pair's freeness gap (Llumnix's `balanced` pairing rule). With `migrate_out_threshold` set,
    sources are instead the workers below it and destinations those at or above it (Llumnix's
    `defrag` mode, threshold in blocks per request, Llumnix default 3.0).
    """

    name = "lb"

    def __init__(
        self,
        migrate_out_threshold: float | None = None,
        headroom_tokens: int = 0,
        place_epochs: float = 2.0,
    ) -> None:
        self.migrate_out_threshold = migrate_out_threshold
        self.headroom_tokens = headroom_tokens
        self.place_epochs = place_epochs

    def place(self, view: PolicyView, arrival: Arrival) -> Placement | Rejection:
        workers, need = _need(view, arrival)
        best: WorkerInfo | None = None
        best_free = -1.0
        headroom, epochs, ceil = self.headroom_tokens, self.place_epochs, math.ceil
        for w in workers:  # `reserve` and `freeness`, inlined: this runs for every arrival
            blocks = w.request_blocks
            if not blocks:
                continue
            n = len(blocks)
            free = w.num_free_blocks
            keep = ceil(headroom / w.block_size * epochs * (n + 1)) if headroom > 0 else 0
            if free < need + keep:
                continue
            f = free / n
            if f > best_free:
                best, best_free = w, f
        if best is None:
            best = _first_idle(workers, need)
        return Placement(best.worker_id) if best else _no_room(arrival, need)

    def plan_epoch(self, view: PolicyView, now: float) -> list[Move]:
        moves: list[Move] = []
        for model in view.models():
            busy = [w for w in active_workers(view, model) if w.request_blocks]
            if len(busy) < 2:
                continue
            scored = [(freeness(w), w) for w in busy]  # the view does not change here
            if self.migrate_out_threshold is None:
                cut = sum(f for f, _ in scored) / len(busy)
            else:
                cut = self.migrate_out_threshold
            low = sorted((p for p in scored if p[0] < cut), key=_first)
            high = sorted((p for p in scored if p[0] >= cut), key=_first, reverse=True)
            f_of = {id(w): f for f, w in scored}
            sources, dests = [w for _, w in low], [w for _, w in high]
            for src, dst in zip(sources, dests, strict=False):
                if len(src.request_blocks) < 2:
                    continue
                rid, size = min(src.request_blocks.items(), key=lambda kv: (kv[1], kv[0]))
                if free_blocks(dst) < size + reserve(dst, self.headroom_tokens, self.place_epochs):
                    continue
                src_after = (free_blocks(src) + size) / (len(src.request_blocks) - 1)
                dst_after = (free_blocks(dst) - size) / (len(dst.request_blocks) + 1)
                if abs(dst_after - src_after) >= f_of[id(dst)] - f_of[id(src)]:
                    continue
                moves.append(Move(rid, src.worker_id, dst.worker_id, "kv"))
        return moves
