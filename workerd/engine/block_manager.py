"""KV block accounting: per-layer pools of fixed-size pages and per-request, per-layer tables.

Each layer has its own pool of `num_blocks` pages (its own KV tensor), its own free list and
reference counts, and each request has one block table per layer. Operations default to all
layers, in lockstep, so that all of a request's tables are normally equal (`is_uniform`); a
subset of layers can be given, so that later work (LayerKV) can hold some layers of a request
elsewhere. A block a copy still reads or writes is *fenced* when its request lets go of it
(`fence`): out of use but not yet free, until the copy is done (`unfence`). The host tier of
LayerKV is a second BlockManager. Invariant, per layer, at all times:
free + used + fenced + beyond == total.

Elastic pools (`low_first`): free blocks are handed out lowest id first, so the pool's live
blocks stay packed at the bottom; `set_limit(n)` makes only ids below `n` allocatable (free
blocks at or above it, and those released there later, are *beyond*: out of the pool, their
memory can be given back); `top()` is one past the highest block still live, and `relocate`
moves a block's identity down (compaction; the caller copies its KV).

Prefix caching (automatic, vLLM v1's scheme): a block holding a full block of a prompt can be
*cached* under its chained hash (`mell.common.hashing`, one hash per KV block), per layer
(`cache_blocks`). A new request shares the cached blocks of its longest cached prefix
(`share_prefix`: reference counts, no copy). A cached block nobody holds stays cached on an
LRU of free-but-cached blocks: it counts as free, and is evicted (loses its hash) only when
`take` runs out of plain free blocks, least recently released first. A block in use is never
evicted; a block that is fenced leaves the cache (its copy may outlive its content).

The block manager only counts; it never touches tensors.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from itertools import islice

from mell.common.errors import MellError


class OutOfBlocks(MellError):
    """Not enough free blocks; the caller should have asked `can_append` first."""


class _LayerPool:
    __slots__ = (
        "beyond",
        "cached",
        "fenced",
        "free",
        "hash_of",
        "limit",
        "low_first",
        "lru",
        "refs",
    )

    def __init__(self, num_blocks: int, low_first: bool = False) -> None:
        # A stack that pops 0, 1, 2, ... or (low_first) a min-heap.
        self.low_first = low_first
        self.free = list(range(num_blocks)) if low_first else list(range(num_blocks - 1, -1, -1))
        self.limit = num_blocks  # blocks at or above it are never handed out
        self.beyond: set[int] = set()  # free blocks at or above `limit`
        self.refs = [0] * num_blocks
        self.fenced: set[int] = set()
        self.cached: dict[int, int] = {}  # block hash -> block
        self.hash_of: dict[int, int] = {}  # block -> its hash (cached blocks only)
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.lru)

    def take(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        while len(self.free) < n:  # evict: the least recently released cached block
            block, _ = self.lru.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
            self.push_free(block)
        if self.low_first:
            blocks = [heapq.heappop(self.free) for _ in range(n)]
        else:
            blocks = self.free[len(self.free) - n :][::-1]
            del self.free[len(self.free) - n :]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def hit(self, block_hash: int) -> int:
        """Take a reference to the block cached under `block_hash` (KeyError: not cached)."""
        block = self.cached[block_hash]
        self.lru.pop(block, None)
        self.refs[block] += 1
        return block

    def cache(self, block_hash: int, block: int) -> None:
        """Cache a held block under its hash (no-op if either is cached already)."""
        if block_hash not in self.cached and block not in self.hash_of:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash

    def release(self, blocks: Sequence[int], fence: bool = False) -> list[int]:
        """Drop one reference to each block; those nobody holds any more go back to the free
        list, or (fence) to the fenced set. Returns the blocks that left use."""
        # Pushed last block first, so the next `take` pops them in their old order: a request
        # placed after one that left gets runs of consecutive blocks again (a migration sends
        # a frame per run).
        # Cached blocks join the LRU tail first, so a prompt's last blocks are evicted first.
        gone = []
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                gone.append(b)
        if fence:
            for b in gone:
                self._uncache(b)
            self.fenced.update(gone)
        else:
            for b in gone:
                if b in self.hash_of and b < self.limit:
                    self.lru[b] = None
                else:
                    self._uncache(b)
                    self.push_free(b)
        gone.reverse()
        return gone

    def push_free(self, block: int) -> None:
        """A block nobody holds, uncached: free, or beyond the limit."""
        if block >= self.limit:
            self.beyond.add(block)
        elif self.low_first:
            heapq.heappush(self.free, block)
        else:
            self.free.append(block)

    def set_limit(self, limit: int) -> None:
        """Only blocks below `limit` are handed out from now on; free (and free-but-cached)
        blocks at or above it go beyond, those coming back below it are free again."""
        old, self.limit = self.limit, limit
        if limit < old:
            for b in [b for b in self.lru if b >= limit]:
                self._uncache(b)
                self.beyond.add(b)
            kept = [b for b in self.free if b < limit]
            self.beyond.update(b for b in self.free if b >= limit)
            self.free = kept
            if self.low_first:
                heapq.heapify(self.free)
            else:
                self.free.sort(reverse=True)
        else:
            back = sorted(b for b in self.beyond if b < limit)
            self.beyond.difference_update(back)
            for b in reversed(back):
                self.push_free(b)

    def top(self, cached: bool = True) -> int:
        """One past the highest block in use, fenced or (`cached`) cached (0: none)."""
        top = max(self.fenced, default=-1)
        if cached:
            top = max(top, max(self.lru, default=-1))
        for b in range(len(self.refs) - 1, top, -1):
            if self.refs[b] > 0:
                return b + 1
        return top + 1

    def take_lowest_below(self, bound: int) -> int | None:
        """A plain free block below `bound`, the lowest one (low_first pools), taken out of the
        free list with no reference (relocate gives it one); None if there is none."""
        if not self.free or self.free[0] >= bound:
            return None
        return heapq.heappop(self.free)

    def _uncache(self, block: int) -> None:
        block_hash = self.hash_of.pop(block, None)
        if block_hash is not None:
            del self.cached[block_hash]
        self.lru.pop(block, None)

    def evict_cached(self) -> int:
        """Evict every cached block nobody holds (the whole LRU); how many."""
        n = len(self.lru)
        while self.lru:
            block, _ = self.lru.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
            self.free.append(block)
        return n

    def unfence(self, blocks: Sequence[int]) -> None:
        for b in reversed(blocks):
            self.fenced.remove(b)  # (KeyError: a block unfenced twice, or never fenced)
            self.push_free(b)


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, num_layers: int, *, low_first: bool = False
    ) -> None:
        if num_blocks <= 0 or block_size <= 0 or num_layers <= 0:
            raise ValueError("num_blocks, block_size and num_layers must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self._pools = [_LayerPool(num_blocks, low_first) for _ in range(num_layers)]
        self._tables: dict[str, list[list[int]]] = {}
        self._uniform: dict[str, bool] = {}

    # -- queries ----------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free(self, layer: int | None = None) -> int:
        """Free blocks of one layer, or the fewest over all layers."""
        if layer is not None:
            return self._pools[layer].num_free
        return min(p.num_free for p in self._pools)

    def num_used(self, layer: int) -> int:
        return sum(1 for r in self._pools[layer].refs if r > 0)

    def num_fenced(self, layer: int | None = None) -> int:
        """Blocks out of use whose copies are still in flight (the most over all layers)."""
        if layer is not None:
            return len(self._pools[layer].fenced)
        return max(len(p.fenced) for p in self._pools)

    def num_beyond(self, layer: int = 0) -> int:
        """Free blocks of `layer` at or above the limit (out of the pool)."""
        return len(self._pools[layer].beyond)

    @property
    def limit(self) -> int:
        return self._pools[0].limit

    def top(self, cached: bool = True) -> int:
        """One past the highest block in use, fenced or (`cached`) cached but free, in any
        layer: the pool's live extent (blocks from here up hold nothing anybody will read)."""
        return max(p.top(cached) for p in self._pools)

    def holders_above(self, bound: int) -> list[str]:
        """Requests holding a block at or above `bound` in some layer."""
        return [
            r for r, tables in self._tables.items() if any(b >= bound for t in tables for b in t)
        ]

    def num_cached(self, layer: int = 0) -> int:
        """Blocks of `layer` cached under a hash (held or not)."""
        return len(self._pools[layer].cached)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading `hashes` are cached in every layer (a query: changes nothing)."""
        n = 0
        for h in hashes:
            if not all(h in p.cached for p in self._pools):
                break
            n += 1
        return n

    def cached_hashes(self, limit: int) -> tuple[list[int], list[int]]:
        """Layer 0's cached hashes, at most `limit` in all: those of blocks in use, then those
        of free-but-cached blocks, most recently released first."""
        pool = self._pools[0]
        used = list(islice((h for b, h in pool.hash_of.items() if pool.refs[b] > 0), limit))
        free = [pool.hash_of[b] for b in islice(reversed(pool.lru), max(0, limit - len(used)))]
        return used, free

    def holds_shared(self, request_id: str) -> bool:
        """The request holds a block another request holds too (a shared cached prefix)."""
        tables = self._tables.get(request_id, ())
        return any(
            pool.refs[b] > 1
            for pool, table in zip(self._pools, tables, strict=False)
            for b in table
        )

    def ref_count(self, layer: int, block: int) -> int:
        return self._pools[layer].refs[block]

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def requests(self) -> list[str]:
        return list(self._tables)

    def block_table(self, request_id: str, layer: int = 0) -> list[int]:
        return self._tables[request_id][layer]

    def is_uniform(self, request_id: str) -> bool:
        """True when every layer of the request has the same block table."""
        return self._uniform[request_id]

    def num_blocks_of(self, request_id: str) -> int:
        """Blocks the request holds, the most over its layers (0 if unknown)."""
        tables = self._tables.get(request_id)
        return max(len(t) for t in tables) if tables else 0

    def attributed_blocks(self, request_ids: Sequence[str]) -> dict[str, int]:
        """Blocks per request with each shared block counted once, for the first of
        `request_ids` holding it (the most over layers): the counts add up to the blocks
        these requests hold together."""
        seen: list[set[int]] = [set() for _ in range(self.num_layers)]
        out = {}
        for rid in request_ids:
            tables = self._tables.get(rid)
            if tables is None:
                out[rid] = 0
                continue
            most = 0
            for layer_seen, table in zip(seen, tables, strict=True):
                new = [b for b in table if b not in layer_seen]
                layer_seen.update(new)
                most = max(most, len(new))
            out[rid] = most
        return out

    def blocks_needed(
        self, request_id: str, num_tokens: int, layers: Sequence[int] | None = None
    ) -> int:
        """Extra blocks per layer (the most over `layers`) to hold `num_tokens` in total."""
        want = self.blocks_for(num_tokens)
        tables = self._tables.get(request_id)
        if tables is None:
            return want
        return max(max(0, want - len(tables[i])) for i in self._layers(layers))

    def can_append(
        self, request_id: str, num_tokens: int, layers: Sequence[int] | None = None
    ) -> bool:
        want = -(-num_tokens // self.block_size)
        tables = self._tables.get(request_id)
        if tables is not None and layers is None and self._uniform[request_id]:
            need = want - len(tables[0])  # fast path: all layers alike
            return need <= 0 or all(need <= p.num_free for p in self._pools)
        for i in self._layers(layers):
            have = len(tables[i]) if tables else 0
            if want - have > self._pools[i].num_free:
                return False
        return True

    # -- changes ----------------------------------------------------------------------------

    def allocate(
        self, request_id: str, num_tokens: int, layers: Sequence[int] | None = None
    ) -> None:
        """Create the request's tables, holding `num_tokens` tokens."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already has blocks")
        if not self.can_append(request_id, num_tokens, layers):
            raise OutOfBlocks(f"request {request_id!r}: not enough free blocks")
        self._tables[request_id] = [[] for _ in range(self.num_layers)]
        self._uniform[request_id] = True
        self.append(request_id, num_tokens, layers)

    def append(self, request_id: str, num_tokens: int, layers: Sequence[int] | None = None) -> None:
        """Grow the request's tables so they hold `num_tokens` tokens in total.

        All-or-nothing: raises OutOfBlocks, changing nothing, if any layer lacks blocks.
        """
        if request_id not in self._tables:
            self.allocate(request_id, num_tokens, layers)
            return
        want = -(-num_tokens // self.block_size)
        tables = self._tables[request_id]
        if layers is None and self._uniform[request_id] and want <= len(tables[0]):
            return  # fast path: decoding inside the last block
        if not self.can_append(request_id, num_tokens, layers):
            raise OutOfBlocks(f"request {request_id!r}: not enough free blocks")
        taken = []
        for i in self._layers(layers):
            if want > len(tables[i]):
                new = self._pools[i].take(want - len(tables[i]))
                tables[i].extend(new)
                taken.append(new)
        if not self._uniform[request_id] or not taken:
            return
        if layers is None:  # lockstep: still uniform if every layer got the same pages
            self._uniform[request_id] = all(t == taken[0] for t in taken)
        else:
            self._uniform[request_id] = all(t == tables[0] for t in tables)

    def free(self, request_id: str) -> int:
        """Release all the request's blocks; returns how many it held (most over layers)."""
        tables = self._tables.pop(request_id, None)
        self._uniform.pop(request_id, None)
        if tables is None:
            return 0
        for pool, table in zip(self._pools, tables, strict=True):
            pool.release(table)
        return max(len(t) for t in tables)

    def fence(self, request_id: str) -> list[list[int]]:
        """Like `free`, but the blocks that leave use are fenced (a copy still touches them)
        until `unfence`; returns them, per layer ([] per layer for an unknown request)."""
        tables = self._tables.pop(request_id, None)
        self._uniform.pop(request_id, None)
        if tables is None:
            return [[] for _ in range(self.num_layers)]
        return [
            pool.release(table, fence=True) for pool, table in zip(self._pools, tables, strict=True)
        ]

    def share_prefix(self, request_id: str, hashes: Sequence[int]) -> int:
        """Create the request's tables from the cached blocks of its longest cached prefix
        (`hashes`, leading blocks; shared: one more reference each); returns how many blocks
        (0: no table is created)."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already has blocks")
        n = self.cached_prefix(hashes)
        if n == 0:
            return 0
        tables = [[p.hit(h) for h in hashes[:n]] for p in self._pools]
        self._tables[request_id] = tables
        self._uniform[request_id] = all(t == tables[0] for t in tables)
        return n

    def cache_blocks(self, request_id: str, hashes: Sequence[int]) -> None:
        """Cache the request's leading blocks (every layer) under `hashes`: the caller vouches
        that their KV is computed and is that of the tokens the hashes cover."""
        for pool, table in zip(self._pools, self._tables[request_id], strict=True):
            for h, b in zip(hashes, table, strict=False):
                pool.cache(h, b)

    def evict_cached(self) -> int:
        """Forget every cached block nobody holds, in every layer (their hashes dropped, the
        blocks plainly free); how many of layer 0's."""
        counts = [pool.evict_cached() for pool in self._pools]
        return counts[0]

    def unfence(self, layer: int, blocks: Sequence[int]) -> None:
        """The copy touching these fenced blocks of `layer` is done: they are free."""
        self._pools[layer].unfence(blocks)

    def set_limit(self, limit: int) -> None:
        """Hand out only blocks below `limit` (every layer) from now on (see the module
        docstring); blocks in use above it stay until released."""
        if not 0 <= limit <= self.num_blocks:
            raise ValueError(f"limit {limit} out of 0..{self.num_blocks}")
        for pool in self._pools:
            pool.set_limit(limit)

    def relocate(self, layer: int, block: int, request_ids: Sequence[str]) -> int | None:
        """Compaction (low_first pools): give the holders of `block` in `layer` (in use, held
        by `request_ids` only, not fenced) the lowest free block below it instead, and free
        `block` (beyond the limit if it is above it); returns the new block (its KV must be
        copied from the old one before anybody reads it), or None if no free block is lower.
        A cached block stays cached under its hash at its new place."""
        pool = self._pools[layer]
        if pool.refs[block] == 0 or block in pool.fenced:
            raise ValueError(f"block {block} of layer {layer} is not in use")
        if sum(self._tables[r][layer].count(block) for r in request_ids) != pool.refs[block]:
            raise ValueError(f"block {block} of layer {layer} has holders outside {request_ids}")
        new = pool.take_lowest_below(block)
        if new is None:
            return None
        pool.refs[new], pool.refs[block] = pool.refs[block], 0
        block_hash = pool.hash_of.pop(block, None)
        if block_hash is not None:
            pool.cached[block_hash] = new
            pool.hash_of[new] = block_hash
        for rid in request_ids:
            tables = self._tables[rid]
            tables[layer][:] = [new if b == block else b for b in tables[layer]]
            self._uniform[rid] = all(t == tables[0] for t in tables)
        pool.push_free(block)
        return new

    def rename(self, old: str, new: str) -> None:
        """Hand `old`'s blocks to `new` (a migrated-in reservation becomes its request)."""
        if new in self._tables:
            raise ValueError(f"request {new!r} already has blocks")
        self._tables[new] = self._tables.pop(old)
        self._uniform[new] = self._uniform.pop(old)

    def fork(self, src: str, dst: str) -> None:
        """Give `dst` the same blocks as `src` (shared, reference-counted)."""
        if dst in self._tables:
            raise ValueError(f"request {dst!r} already has blocks")
        tables = self._tables[src]
        for pool, table in zip(self._pools, tables, strict=True):
            for b in table:
                pool.refs[b] += 1
        self._tables[dst] = [list(t) for t in tables]
        self._uniform[dst] = self._uniform[src]

    def fork_prefix(self, src: str, dst: str, num_tokens: int) -> list[tuple[int, int] | None]:
        """Give `dst` (no blocks yet) the blocks of `src`'s first `num_tokens` tokens: the full
        blocks shared (one more reference each), the block `num_tokens` ends inside copied on
        write: `dst` gets a fresh block of its own, into which the caller copies `src`'s (the
        KV of its first tokens; `dst` writes the rest). Returns per layer the copy to make,
        (src block, dst block), or None when `num_tokens` fills whole blocks. OutOfBlocks,
        changing nothing, when a layer has no free block for the copy."""
        if dst in self._tables:
            raise ValueError(f"request {dst!r} already has blocks")
        full, partial = divmod(num_tokens, self.block_size)
        tables = self._tables[src]
        if any(len(t) < full + (partial > 0) for t in tables):
            raise ValueError(f"request {src!r} holds fewer than {num_tokens} tokens")
        if partial and self.num_free() < 1:
            raise OutOfBlocks(f"request {dst!r}: no free block to copy into")
        forked: list[list[int]] = []
        copies: list[tuple[int, int] | None] = []
        for pool, table in zip(self._pools, tables, strict=True):
            shared = table[:full]
            for b in shared:
                pool.refs[b] += 1
            copy = (table[full], pool.take(1)[0]) if partial else None
            forked.append([*shared, copy[1]] if copy else shared)
            copies.append(copy)
        self._tables[dst] = forked
        self._uniform[dst] = all(t == forked[0] for t in forked)
        return copies

    def _layers(self, layers: Sequence[int] | None) -> Sequence[int]:
        return range(self.num_layers) if layers is None else layers
