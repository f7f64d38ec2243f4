"""The simulated workers' prefix caches: prompt blocks by chained hash, shared by reference.

Each worker keeps the prefix blocks (`Trace.prefix`: chained hashes of full prompt blocks of
`block_tokens` tokens) of its running requests, referenced by every request that uses them,
and, once no running request references a block, keeps it cached on an LRU of free blocks.
Free-but-cached blocks count as free capacity: `trim` evicts them, oldest first, only when the
worker's blocks in use and its cached ones together exceed its capacity. A block some running
request references is never evicted.

A request arriving on a worker reuses the longest run of its leading blocks the worker holds
(in use or cached): their prefill is skipped. Its KV charge on the worker (`view.loads`) is its
whole context less the blocks another running request already holds there: a block referenced
by several requests is charged once, to the first of them (its owner); when the owner leaves,
the next referencing request takes the charge (`release` says who).

The blocks of a request are inserted when it is placed (the simulator sizes a request by its
whole prompt from placement on); a later request may reuse them while the first still
prefills. Engine blocks per prefix block: `block_tokens // block_size` (512 // 16 = 32).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerCache:
    """One worker's prefix blocks: the requests referencing each block in use (the first is
    the block's owner, charged for it), and the free-but-cached blocks, least recently used
    first."""

    refs: dict[int, dict[int, None]] = field(default_factory=dict)
    free: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def __contains__(self, h: int) -> bool:
        return h in self.refs or h in self.free


class PrefixCache:
    """The prefix caches of every simulated worker, and the run's hit counts."""

    def __init__(self, block_tokens: int, block_size: int) -> None:
        if block_tokens < block_size:
            raise ValueError(f"prefix blocks of {block_tokens} tokens < KV blocks of {block_size}")
        self.block_tokens = block_tokens
        self.per_block = block_tokens // block_size  # engine KV blocks per prefix block
        self.workers: dict[str, WorkerCache] = {}
        self.holders: dict[int, set[str]] = {}  # block hash -> workers holding it (any state)
        self.held: dict[int, tuple[str, list[int]]] = {}  # request -> (worker, blocks it refs)
        self.queried_tokens = 0  # prompt tokens looked up at admission
        self.hit_tokens = 0  # of which cached (their prefill skipped)
        self.evicted = 0  # prefix blocks evicted

    # -- queries (pure) ---------------------------------------------------------------------

    def lookup(self, wid: str, hashes: Sequence[int]) -> tuple[int, int]:
        """(leading blocks of `hashes` that `wid` holds, of which blocks in use)."""
        cache = self.workers.get(wid)
        if cache is None:
            return 0, 0
        refs, free = cache.refs, cache.free
        k = shared = 0
        for h in hashes:
            if h in refs:
                shared += 1
            elif h not in free:
                break
            k += 1
        return k, shared

    def hits(self, hashes: Sequence[int], workers: Iterable[str]) -> dict[str, tuple[int, int]]:
        """`lookup` on every worker of `workers` holding the first block (found through the
        hash index, not by scanning every worker)."""
        if not hashes:
            return {}
        first = self.holders.get(hashes[0])
        if not first:
            return {}
        wanted = set(workers)
        return {w: self.lookup(w, hashes) for w in sorted(first & wanted)}

    # -- changes ----------------------------------------------------------------------------

    def acquire(
        self, wid: str, i: int, hashes: Sequence[int], prompt_tokens: int, count: bool = True
    ) -> tuple[int, int]:
        """Request i is admitted on `wid` with prefix blocks `hashes` and a prompt of
        `prompt_tokens`: it references its leading blocks the worker holds, and inserts the
        rest. Returns (prompt tokens cached, engine KV blocks of the request that other running
        requests already hold there: not charged to it). With `count`, the lookup counts in
        the hit rate (a prefill; a KV migration's arrival does not count)."""
        self.release(i)
        cache = self.workers.get(wid)
        if cache is None:
            cache = self.workers[wid] = WorkerCache()
        refs, free, holders = cache.refs, cache.free, self.holders
        k = shared = 0
        hit = True
        for h in hashes:
            users = refs.get(h)
            if users is not None:  # in use: shared (after a miss, which chaining makes
                shared += 1  # impossible, it would be deduplicated, not a hit)
                k += hit
                users[i] = None
                continue
            if h in free:
                del free[h]
                if hit:
                    k += 1
            else:
                hit = False
                holders.setdefault(h, set()).add(wid)
            refs[h] = {i: None}
        self.held[i] = (wid, list(hashes))
        cached = min(k * self.block_tokens, prompt_tokens)
        if count:
            self.queried_tokens += prompt_tokens
            self.hit_tokens += cached
        return cached, shared * self.per_block

    def release(self, i: int) -> dict[int, int]:
        """Request i leaves its worker (finished, preempted, migrated): it drops its references;
        a block nobody references any more joins the free LRU (most recent last). Returns the
        engine blocks each other request now owns in addition (request -> blocks)."""
        held = self.held.pop(i, None)
        if held is None:
            return {}
        wid, hashes = held
        cache = self.workers[wid]
        refs, free = cache.refs, cache.free
        gained: dict[int, int] = {}
        for h in reversed(hashes):  # the tail first: the LRU evicts a prefix's tail first
            users = refs[h]
            owner = next(iter(users))
            del users[i]
            if not users:
                del refs[h]
                free[h] = None
            elif owner == i:
                heir = next(iter(users))
                gained[heir] = gained.get(heir, 0) + self.per_block
        return gained

    def trim(self, wid: str, used: int, capacity: int) -> int:
        """Evict `wid`'s least recently used free blocks until its blocks in use (`used`
        engine blocks) and its cached ones fit `capacity`; returns the prefix blocks evicted.
        Blocks in use are never evicted."""
        cache = self.workers.get(wid)
        if cache is None:
            return 0
        free, per = cache.free, self.per_block
        room = (capacity - used) // per if capacity > used else 0
        n = 0
        while len(free) > room:
            h, _ = free.popitem(last=False)
            self._unhold(h, wid)
            n += 1
        self.evicted += n
        return n

    def cached_blocks(self, wid: str) -> int:
        """Prefix blocks `wid` holds (in use or cached)."""
        cache = self.workers.get(wid)
        return len(cache.refs) + len(cache.free) if cache is not None else 0

    def drop(self, wid: str) -> None:
        """The worker is released: its cache goes with it (no request may hold a block)."""
        cache = self.workers.pop(wid, None)
        if cache is None:
            return
        assert not cache.refs, f"{wid} released with prefix blocks in use"
        for h in cache.free:
            self._unhold(h, wid)

    def _unhold(self, h: int, wid: str) -> None:
        ws = self.holders[h]
        ws.discard(wid)
        if not ws:
            del self.holders[h]

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
