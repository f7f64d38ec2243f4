"""The chained block hashes that the gateway and the worker must agree on bit for bit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mell.common.hashing import ROOT_HASH, block_hashes, chain_hash, chain_hashes

tokens = st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=80)


def test_pinned_values() -> None:
    # A change of encoding would split the caches of a gateway and a worker of different
    # versions: these values are part of the contract.
    assert chain_hash(ROOT_HASH, [1, 2, 3, 4]) == 0x97495F0FB1021B28
    assert block_hashes(list(range(8)), 4) == [
        chain_hash(ROOT_HASH, [0, 1, 2, 3]),
        chain_hash(chain_hash(ROOT_HASH, [0, 1, 2, 3]), [4, 5, 6, 7]),
    ]


@settings(max_examples=60, deadline=None)
@given(tokens, st.integers(1, 9))
def test_deterministic_and_only_full_blocks(ids: list[int], size: int) -> None:
    hashes = block_hashes(ids, size)
    assert hashes == block_hashes(list(ids), size)
    assert len(hashes) == len(ids) // size


@settings(max_examples=60, deadline=None)
@given(tokens, tokens, st.integers(1, 6))
def test_same_prefix_same_hashes(common: list[int], tail: list[int], size: int) -> None:
    a, b = block_hashes(common + tail, size), block_hashes(common, size)
    assert a[: len(b)] == b


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=4, max_size=60), st.integers(1, 5), st.data())
def test_a_change_at_block_i_changes_every_hash_from_i_on(
    ids: list[int], size: int, data: st.DataObject
) -> None:
    n = len(ids) // size
    if n == 0:
        return
    pos = data.draw(st.integers(0, n * size - 1))
    changed = list(ids)
    changed[pos] += 1
    a, b = block_hashes(ids, size), block_hashes(changed, size)
    i = pos // size
    assert a[:i] == b[:i]
    assert all(x != y for x, y in zip(a[i:], b[i:], strict=True))


def test_position_matters_not_only_content() -> None:
    # the same block after different parents: different hashes (the chain)
    assert chain_hashes([(7,), (7,)])[1] != chain_hashes([(7,)])[0]


def test_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)
