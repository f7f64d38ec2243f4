"""KV block accounting: per-layer pools of fixed-size pages and per-request, per-layer tables.

Each layer has its own pool of `num_blocks` pages (its own KV tensor), its own free list and
reference counts, and each request has one block table per layer. Operations default to all
layers, in lockstep, so that all of a request's tables are normally equal (`is_uniform`); a
subset of layers can be given, so that later work (LayerKV) can hold some layers of a request
elsewhere. A block a copy still reads or writes is *fenced* when its request lets go of it
(`fence`): out of use but not yet free, until the copy is done (`unfence`). The host tier of
LayerKV is a second BlockManager. Invariant, per layer, at all times:
free + used + fenced == total.

The block manager only counts; it never touches tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from mell.common.errors import MellError


class OutOfBlocks(MellError):
    """Not enough free blocks; the caller should have asked `can_append` first."""


class _LayerPool:
    __slots__ = ("fenced", "free", "refs")

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: pops 0, 1, 2, ...
        self.refs = [0] * num_blocks
        self.fenced: set[int] = set()

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfBlocks(f"need {n} blocks, {len(self.free)} free")
        blocks = self.free[len(self.free) - n :][::-1]
        del self.free[len(self.free) - n :]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def release(self, blocks: Sequence[int], fence: bool = False) -> list[int]:
        """Drop one reference to each block; those nobody holds any more go back to the free
        list, or (fence) to the fenced set. Returns the blocks that left use."""
        # Pushed last block first, so the next `take` pops them in their old order: a request
        # placed after one that left gets runs of consecutive blocks again (a migration sends
        # a frame per run).
        gone = []
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                gone.append(b)
        if fence:
            self.fenced.update(gone)
        else:
            self.free.extend(gone)
        gone.reverse()
        return gone

    def unfence(self, blocks: Sequence[int]) -> None:
        for b in reversed(blocks):
            self.fenced.remove(b)  # (KeyError: a block unfenced twice, or never fenced)
            self.free.append(b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_layers: int) -> None:
        if num_blocks <= 0 or block_size <= 0 or num_layers <= 0:
            raise ValueError("num_blocks, block_size and num_layers must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self._pools = [_LayerPool(num_blocks) for _ in range(num_layers)]
        self._tables: dict[str, list[list[int]]] = {}
        self._uniform: dict[str, bool] = {}

    # -- queries ----------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free(self, layer: int | None = None) -> int:
        """Free blocks of one layer, or the fewest over all layers."""
        if layer is not None:
            return len(self._pools[layer].free)
        return min(len(p.free) for p in self._pools)

    def num_used(self, layer: int) -> int:
        return sum(1 for r in self._pools[layer].refs if r > 0)

    def num_fenced(self, layer: int | None = None) -> int:
        """Blocks out of use whose copies are still in flight (the most over all layers)."""
        if layer is not None:
            return len(self._pools[layer].fenced)
        return max(len(p.fenced) for p in self._pools)

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
            return need <= 0 or all(need <= len(p.free) for p in self._pools)
        for i in self._layers(layers):
            have = len(tables[i]) if tables else 0
            if want - have > len(self._pools[i].free):
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

    def unfence(self, layer: int, blocks: Sequence[int]) -> None:
        """The copy touching these fenced blocks of `layer` is done: they are free."""
        self._pools[layer].unfence(blocks)

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

    def _layers(self, layers: Sequence[int] | None) -> Sequence[int]:
        return range(self.num_layers) if layers is None else layers
