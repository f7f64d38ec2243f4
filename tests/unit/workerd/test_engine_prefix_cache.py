"""Automatic prefix caching: the block manager's cache of prompt blocks (sharing, LRU eviction,
fences) and the engine on mell-tiny (same tokens with caching on and off, skipped prefill,
cached_tokens and counters, no leak, with preemption, the host tier and migration's import)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mell.common.config import EngineConfig
from mell.common.hashing import block_hashes
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.engine import Engine, RequestOutput

BS = 4


def check_invariants(bm: BlockManager) -> None:
    """free + used + fenced == total; blocks in tables are held; no held block is free."""
    for layer in range(bm.num_layers):
        pool = bm._pools[layer]
        assert bm.num_free(layer) + bm.num_used(layer) + len(pool.fenced) == bm.num_blocks
        held = {b for r in bm.requests() for b in bm.block_table(r, layer)}
        assert all(pool.refs[b] > 0 for b in held)
        free = set(pool.free) | set(pool.lru)
        assert not free & held and not free & pool.fenced
        assert len(free) == pool.num_free  # no block twice
        assert all(pool.refs[b] == 0 and b in pool.hash_of for b in pool.lru)
        assert {pool.cached[h]: h for h in pool.cached} == pool.hash_of
    if all(bm.is_uniform(r) for r in bm.requests()):
        assert sum(bm.attributed_blocks(bm.requests()).values()) == bm.num_used(0)


def test_cached_blocks_are_shared_kept_and_evicted_last_released_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, num_layers=2)
    hashes = block_hashes(list(range(12)), BS)
    bm.allocate("a", 13)
    bm.cache_blocks("a", hashes)
    assert bm.share_prefix("b", hashes[:2]) == 2
    assert bm.block_table("b") == bm.block_table("a")[:2]
    assert bm.ref_count(0, bm.block_table("a")[0]) == 2
    bm.free("a")
    check_invariants(bm)
    assert bm.num_free() == 8 - 2  # a's third cached block and its uncached fourth are free
    bm.free("b")
    assert bm.num_free() == 8 and bm.num_cached() == 3
    assert bm.cached_prefix(hashes) == 3
    used, free = bm.cached_hashes(10)
    assert used == [] and sorted(free) == sorted(hashes)
    bm.allocate("c", 5 * BS)  # 5 plain free blocks: the cache is untouched
    assert bm.cached_prefix(hashes) == 3
    bm.append("c", 6 * BS)  # one more: evicts the least recently released, the prompt's tail
    assert bm.cached_prefix(hashes) == 2 and bm.num_cached() == 2
    check_invariants(bm)


def test_a_fenced_block_leaves_the_cache() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, num_layers=1)
    hashes = block_hashes(list(range(8)), BS)
    bm.allocate("a", 8)
    bm.cache_blocks("a", hashes)
    bm.share_prefix("b", hashes[:1])
    fenced = bm.fence("a")  # (a swap-out: its copy reads them)
    assert fenced == [[bm.block_table("b")[0] + 1]]  # the shared one stays held by b
    assert bm.cached_prefix(hashes) == 1
    bm.unfence(0, fenced[0])
    check_invariants(bm)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "free", "fence", "grow", "unfence"]),
            st.integers(0, 5),  # which prompt (they share prefixes)
            st.integers(1, 30),  # tokens
        ),
        max_size=60,
    )
)
def test_eviction_under_pressure_never_frees_a_block_in_use(ops) -> None:
    """Random admissions (sharing cached prefixes), growth, frees and fences on a small pool:
    the invariants hold after every operation, and a held block's hash and content owner never
    change under it (eviction only takes free-but-cached blocks)."""
    bm = BlockManager(num_blocks=12, block_size=BS, num_layers=2)
    prompts = [[p % 3] * 8 + list(range(p, p + 24)) for p in range(6)]  # 3 shared heads
    live: dict[str, int] = {}
    fenced: list[tuple[int, list[int]]] = []
    for i, (op, which, tokens) in enumerate(ops):
        rid = f"r{i}"
        if op == "add":
            hashes = block_hashes(prompts[which][:tokens], BS)
            shared = bm.share_prefix(rid, hashes[: (tokens - 1) // BS])
            if not bm.can_append(rid, tokens):
                if shared:
                    bm.free(rid)
                continue
            before = {r: [list(bm.block_table(r, la)) for la in range(2)] for r in live}
            bm.append(rid, tokens)
            bm.cache_blocks(rid, hashes)
            for r, tables in before.items():  # nobody else's blocks moved
                assert [bm.block_table(r, la) for la in range(2)] == tables
            live[rid] = tokens
        elif op == "grow" and live:
            r = sorted(live)[which % len(live)]
            if bm.can_append(r, live[r] + tokens):
                live[r] += tokens
                bm.append(r, live[r])
        elif op in ("free", "fence") and live:
            r = sorted(live)[which % len(live)]
            del live[r]
            if op == "free":
                bm.free(r)
            else:
                fenced += list(enumerate(bm.fence(r)))
        elif op == "unfence" and fenced:
            layer, ids = fenced.pop(0)
            bm.unfence(layer, ids)
        check_invariants(bm)
    for r in live:
        bm.free(r)
    for layer, ids in fenced:
        bm.unfence(layer, ids)
    check_invariants(bm)
    assert bm.num_free() == bm.num_blocks  # no leak


# -- the engine on mell-tiny -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def make(tiny, **kw) -> Engine:
    return Engine(EngineConfig(model=str(tiny), max_model_len=512, **kw))


def prompt(n: int, start: int = 5) -> list[int]:
    return [(start + 7 * i) % 500 + 3 for i in range(n)]


def drain(eng: Engine) -> tuple[dict[str, list[int]], dict[str, RequestOutput]]:
    """Step until idle: tokens and last output per request."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, RequestOutput] = {}
    while eng.has_unfinished():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            last[out.request_id] = out
    return tokens, last


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)


def turns() -> dict[str, list[int]]:
    """Chat-like prompts: a common system prefix, then growing histories."""
    system = prompt(40)
    return {
        "t0": system + prompt(9, start=3),
        "t1": system + prompt(9, start=3) + prompt(21, start=11),
        "t2": system + prompt(9, start=3) + prompt(21, start=11) + prompt(17, start=2),
        "other": prompt(33, start=50),
    }


def run(tiny_dir, caching: bool, sequential: bool, **kw) -> tuple[dict, dict, object]:
    eng = make(tiny_dir, enable_prefix_caching=caching, **kw)
    tokens: dict[str, list[int]] = {}
    last: dict = {}
    reqs = turns()
    for rid, p in reqs.items():
        eng.add_request(rid, p, SEEDED if rid == "t1" else GREEDY)
        if sequential:
            got, out = drain(eng)
            tokens.update(got)
            last.update(out)
    if not sequential:
        got, out = drain(eng)
        tokens.update(got)
        last.update(out)
    return tokens, last, eng


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_batched_tokens": 16},  # chunked prefill after the cached prefix
        {"num_kv_blocks": 12, "max_num_batched_tokens": 32},  # preemption and eviction
        {
            "num_kv_blocks": 16,
            "kv_offload": "swap",
            "host_kv_bytes": 1 << 20,
            "kv_offload_force": True,
        },  # swapped out and back
    ],
)
def test_same_tokens_with_caching_on_and_off(tiny, kw) -> None:
    for sequential in (True, False):
        off, _, _ = run(tiny, False, sequential, **kw)
        on, last, eng = run(tiny, True, sequential, **kw)
        assert on == off
        stats = eng.stats()
        assert stats.num_free_blocks == stats.num_total_blocks  # no leak
        assert all(eng.blocks.num_used(la) == 0 for la in range(eng.blocks.num_layers))
        if sequential and "kv_offload" not in kw:  # each turn finds the one before it
            assert last["t1"].num_cached_tokens == 48  # (40 + 9) // 16 blocks
            assert last["t2"].num_cached_tokens == 64
            assert last["other"].num_cached_tokens == 0
            assert stats.prefix_cache_hits_total >= 48 + 64
        assert stats.prefix_cache_queries_total >= sum(len(p) for p in turns().values())


def test_prefill_skips_the_cached_prefix_but_computes_one_token(tiny) -> None:
    eng = make(tiny)
    p = prompt(48)  # three full blocks exactly
    eng.add_request("a", p, GREEDY)
    first, _ = drain(eng)
    eng.add_request("b", p, GREEDY)
    batch = eng.scheduler.schedule()
    assert batch.num_tokens == [16]  # two blocks shared; the third's tokens computed again
    assert eng.scheduler.running[0].num_computed == 32
    eng.scheduler.running.clear()
    eng.blocks.free("b")
    eng.abort("b")
    eng.add_request("c", p, GREEDY)
    again, last = drain(eng)
    assert again["c"] == first["a"] and last["c"].num_cached_tokens == 32
    off = make(tiny, enable_prefix_caching=False)
    off.add_request("c", p, GREEDY)
    drain(off)
    assert off.stats().prefix_cache_queries_total == 0


def test_a_migrated_in_request_caches_its_prompt(tiny) -> None:
    src = make(tiny)
    p = prompt(40)
    src.add_request("m", p, GREEDY)
    while src.request_state("m").num_computed < 40:
        src.step()
    req = src.export_request("m", with_kv=True)
    dst = make(tiny)
    dst.reserve("key", dst.blocks.blocks_for(req.num_computed))
    for layer in range(src.kv_layout.num_layers):
        frames = src.read_kv("m", layer, src.block_table("m", layer))
        dst.write_kv("key", layer, dst.block_table("key", layer), [data for _, data in frames])
    dst.import_request("key", req)
    dst.step()
    assert dst.blocks.cached_prefix(block_hashes(p, 16)) == 2  # its own copies, now cached


def test_a_request_sharing_cached_blocks_is_recomputed_not_swapped(tiny) -> None:
    eng = make(tiny, kv_offload="swap", host_kv_bytes=1 << 20)
    p = prompt(40)
    eng.add_request("a", p, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    eng.step()
    eng.add_request("b", [*p, 7], GREEDY)
    eng.step()
    _, b = eng.scheduler.running
    assert eng.blocks.holds_shared("b") and eng.blocks.holds_shared("a")
    assert not eng.scheduler._swap_pays(b)  # a copy would read blocks "a" may let go of
    held = eng.stats().request_blocks  # the load report counts the two shared blocks once
    assert held == {"a": 3, "b": 1}
    assert sum(held.values()) == eng.blocks.num_used(0)
    eng.abort("a")
    assert not eng.blocks.holds_shared("b") and eng.scheduler._swap_pays(b)


def test_a_request_asking_for_prompt_logprobs_computes_its_whole_prompt(tiny) -> None:
    """Its prompt's positions are all computed (a cached prefix would skip them), so it
    neither reads nor fills the cache: the same logprobs as on an engine without caching."""
    p = prompt(48)
    asks = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1, ignore_eos=True)

    def prompt_logprobs(eng: Engine) -> list[float]:
        eng.add_request("warm", p, GREEDY)
        drain(eng)
        eng.add_request("pl", p, asks)
        outputs = [o for o in eng.step() if o.request_id == "pl"]
        drain(eng)
        [first] = outputs
        assert first.prompt_logprobs is not None and first.num_cached_tokens == 0
        return [e.logprob for e in first.prompt_logprobs]

    on = prompt_logprobs(make(tiny))
    assert len(on) == len(p) - 1
    assert on == pytest.approx(prompt_logprobs(make(tiny, enable_prefix_caching=False)))
