"""The simulator's prefix-cache model: sharing by reference, charges, LRU eviction."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mell.common.hashing import chain_hashes
from mell.gateway.sim.prefix_cache import PrefixCache

PER = 4  # KV blocks per prefix block in these tests (64-token prefix blocks, 16-token blocks)


def prefix(*ids: int) -> list[int]:
    return chain_hashes((i,) for i in ids)


def test_shared_blocks_are_charged_once_and_handed_on() -> None:
    cache = PrefixCache(64, 16)
    a, b = prefix(1, 2, 3), prefix(1, 2, 9)
    assert cache.acquire("w", 0, a, 200) == (0, 0)  # cold: nothing cached, nothing shared
    cached, shared = cache.acquire("w", 1, b, 200)
    assert (cached, shared) == (128, 2 * PER)  # two leading blocks held by request 0
    assert cache.release(0) == {1: 2 * PER}  # request 1 now owns them
    assert cache.workers["w"].free == {a[2]: None}  # request 0's own block: free, cached
    assert cache.release(1) == {}
    assert cache.hits(prefix(1, 2, 3, 4), ["w", "v"]) == {"w": (3, 0)}


def test_free_cached_blocks_are_evicted_oldest_first_only_when_room_is_needed() -> None:
    cache = PrefixCache(64, 16)
    old, new = prefix(1, 2), prefix(5, 6)
    cache.acquire("w", 0, old, 128)
    cache.release(0)
    cache.acquire("w", 1, new, 128)
    cache.release(1)
    assert cache.trim("w", used=0, capacity=4 * PER) == 0  # 4 cached blocks fit
    assert cache.trim("w", used=PER, capacity=4 * PER) == 1  # one must go: old's tail first
    assert cache.lookup("w", old) == (1, 0) and cache.lookup("w", new) == (2, 0)


# operations on two workers: ("acquire", worker, request, prefix ids) / ("release", request) /
# ("trim", worker, capacity in prefix blocks)
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.sampled_from("ab"),
            st.integers(0, 7),
            st.lists(st.integers(0, 3), min_size=0, max_size=5),
        ),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("trim"), st.sampled_from("ab"), st.integers(0, 12)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ops)
def test_eviction_never_frees_a_block_in_use_and_charges_add_up(script: list[tuple]) -> None:
    cache = PrefixCache(64, 16)
    charge: dict[int, int] = {}  # request -> prefix KV blocks charged to it
    where: dict[int, tuple[str, list[int]]] = {}
    for op in script:
        if op[0] == "acquire":
            _, wid, i, ids = op
            if i in where:  # acquire releases first: the charges of the heirs follow
                for r, extra in cache.release(i).items():
                    charge[r] += extra
                del where[i], charge[i]
            hashes = prefix(*ids)
            _, shared = cache.acquire(wid, i, hashes, len(ids) * 64 + 1)
            charge[i] = len(hashes) * PER - shared
            where[i] = (wid, hashes)
        elif op[0] == "release":
            if op[1] in where:
                for r, extra in cache.release(op[1]).items():
                    charge[r] += extra
                del where[op[1]], charge[op[1]]
        else:
            _, wid, cap = op
            in_use = len(cache.workers[wid].refs) * PER if wid in cache.workers else 0
            cache.trim(wid, in_use, cap * PER)
            if wid in cache.workers:  # in use plus cached fit, unless in use alone is over
                w = cache.workers[wid]
                assert len(w.free) == 0 or (len(w.refs) + len(w.free)) * PER <= cap * PER
        for wid, w in cache.workers.items():
            holders = {i for i, (ww, _) in where.items() if ww == wid}
            # every block of a running request is there and in use; none is both used and free
            for i in holders:
                assert all(h in w.refs and i in w.refs[h] for h in where[i][1])
            assert not (w.refs.keys() & w.free.keys())
            assert all(w.refs[h] for h in w.refs)
            # shared blocks are charged exactly once on the worker
            assert sum(charge[i] for i in holders) == len(w.refs) * PER
            for h in list(w.refs) + list(w.free):
                assert wid in cache.holders[h]
