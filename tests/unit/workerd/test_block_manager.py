"""Property tests of the block manager: accounting never drifts, tables never overlap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mell.workerd.engine.block_manager import BlockManager, OutOfBlocks

NUM_BLOCKS, BLOCK_SIZE, NUM_LAYERS = 12, 4, 3
IDS = st.sampled_from([f"r{i}" for i in range(6)])


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, NUM_LAYERS)
        self.tokens: dict[str, int] = {}  # request -> tokens it was grown to (all layers)
        self.forks: set[str] = set()

    @rule(rid=IDS, n=st.integers(1, 30))
    def grow(self, rid: str, n: int) -> None:
        target = self.tokens.get(rid, 0) + n
        free_before = self.bm.num_free()
        fits = self.bm.can_append(rid, target)
        try:
            self.bm.append(rid, target)
        except OutOfBlocks:
            assert not fits
            assert self.bm.num_free() == free_before, "failed append changed something"
            return
        assert fits
        self.tokens[rid] = target

    @rule(rid=IDS, n=st.integers(1, 30), layer=st.integers(0, NUM_LAYERS - 1))
    def grow_one_layer(self, rid: str, n: int, layer: int) -> None:
        if rid not in self.tokens or rid in self.forks:
            return
        target = self.tokens[rid] + n
        if self.bm.can_append(rid, target, layers=[layer]):
            self.bm.append(rid, target, layers=[layer])
            need = self.bm.blocks_for(target)
            assert len(self.bm.block_table(rid, layer)) >= need

    @rule(rid=IDS)
    def free(self, rid: str) -> None:
        held = self.bm.num_blocks_of(rid)
        assert self.bm.free(rid) == held
        self.tokens.pop(rid, None)
        self.forks.discard(rid)
        assert not self.bm.has(rid)

    @precondition(lambda self: self.tokens)
    @rule(dst=IDS, data=st.data())
    def fork(self, dst: str, data: st.DataObject) -> None:
        if dst in self.tokens:
            return
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.fork(src, dst)
        self.tokens[dst] = self.tokens[src]
        self.forks.update((src, dst))

    @invariant()
    def free_plus_used_is_total(self) -> None:
        for layer in range(NUM_LAYERS):
            assert self.bm.num_free(layer) + self.bm.num_used(layer) == NUM_BLOCKS

    @invariant()
    def reference_counts_match_tables(self) -> None:
        for layer in range(NUM_LAYERS):
            counts = [0] * NUM_BLOCKS
            for rid in self.bm.requests():
                for b in self.bm.block_table(rid, layer):
                    counts[b] += 1
            for b in range(NUM_BLOCKS):
                assert self.bm.ref_count(layer, b) == counts[b]

    @invariant()
    def tables_hold_their_tokens(self) -> None:
        for rid, n in self.tokens.items():
            for layer in range(NUM_LAYERS):
                assert len(self.bm.block_table(rid, layer)) >= self.bm.blocks_for(n)
        assert set(self.bm.requests()) == set(self.tokens)

    @invariant()
    def lockstep_tables_are_uniform(self) -> None:
        for rid in self.bm.requests():
            tables = [self.bm.block_table(rid, layer) for layer in range(NUM_LAYERS)]
            if self.bm.is_uniform(rid):
                assert all(t == tables[0] for t in tables)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=8))
@settings(max_examples=60, deadline=None)
def test_growing_then_freeing_everything_restores_the_pool(lengths: list[int]) -> None:
    bm = BlockManager(64, 8, 2)
    for i, n in enumerate(lengths):
        for step in range(1, n + 1):  # one token at a time, as decoding does
            if bm.can_append(f"r{i}", step):
                bm.append(f"r{i}", step)
    for i in range(len(lengths)):
        bm.free(f"r{i}")
    assert bm.num_free() == 64
    assert all(bm.ref_count(layer, b) == 0 for layer in range(2) for b in range(64))


def test_lockstep_allocation_gives_equal_tables_and_blocks_needed() -> None:
    bm = BlockManager(10, 4, 3)
    bm.allocate("a", 9)
    assert bm.is_uniform("a")
    assert [bm.block_table("a", layer) for layer in range(3)] == [[0, 1, 2]] * 3
    assert bm.blocks_needed("a", 13) == 1
    assert bm.blocks_needed("b", 13) == 4
    with pytest.raises(ValueError):
        bm.allocate("a", 1)
    assert not bm.can_append("b", 29)  # 8 blocks, 7 free
    assert bm.free("unknown") == 0
