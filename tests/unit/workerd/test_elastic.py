"""Elastic KV memory on CPU (memory_budget_bytes, kv_pool "virtual"): the block manager's
limit, low-id allocation and compaction; the budget's plan; the virtual host storage giving
memory back (process RSS from /proc); the engine's tokens with the elastic pool on and off;
the budget invariant under random arrivals."""

from __future__ import annotations

import gc
import mmap
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mell.common.config import EngineConfig
from mell.common.errors import ConfigError
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.engine import Engine
from mell.workerd.engine.kv_memory import HostVirtualStorage
from mell.workerd.engine.memory_budget import MAX_FLIPS, ActivationModel, MemoryBudget

HOST = 1 << 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def prompt(n: int, start: int = 5) -> list[int]:
    return [(start + 7 * i) % 500 + 3 for i in range(n)]


def sampling(i: int, max_tokens: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=100 + i, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def make(tiny, **kw) -> Engine:
    base = {"model": str(tiny), "device": "cpu", "max_num_batched_tokens": 256}
    return Engine(EngineConfig(**{**base, **kw}))


def drain(eng: Engine, check=None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if check is not None:
            check(eng)
    return out


def check_budget(eng: Engine) -> None:
    el = eng.elastic
    assert el is not None and el.last is not None
    assert el.last.total <= el.budget.budget_bytes
    assert eng.blocks.top() <= el.last.extent  # nothing live beyond what was accounted
    assert el.budget.flips_in_window() <= MAX_FLIPS


# -- the block manager ----------------------------------------------------------------------


def test_low_first_allocation_limit_and_relocate() -> None:
    bm = BlockManager(8, 4, 2, low_first=True)
    bm.allocate("a", 12)  # blocks 0..2
    bm.allocate("b", 12)  # 3..5
    bm.free("a")
    bm.allocate("c", 4)
    assert bm.block_table("c") == [0]  # the lowest free block, not the last freed
    assert bm.top() == 6
    bm.set_limit(4)  # only 0..3 are handed out; b's blocks 4, 5 stay until they move
    assert bm.num_free() == 2 and bm.num_beyond() == 2
    moved = [bm.relocate(layer, 5, ["b"]) for layer in range(2)]
    assert moved == [1, 1] and bm.block_table("b", 0) == [3, 4, 1] and bm.is_uniform("b")
    assert bm.top() == 5 and bm.num_beyond() == 3  # 5 is beyond now
    for layer in range(2):
        assert bm.relocate(layer, 4, ["b"]) == 2
    assert bm.top() == 4 and bm.num_free() == 0
    bm.set_limit(8)
    assert bm.num_free() == 4
    with pytest.raises(ValueError):
        bm.relocate(0, 3, [])  # b holds it: not a holder given


def test_cached_blocks_above_the_limit_leave_the_cache() -> None:
    bm = BlockManager(8, 4, 1, low_first=True)
    bm.allocate("a", 32)
    bm.cache_blocks("a", list(range(100, 108)))
    bm.free("a")
    assert bm.num_cached() == 8 and bm.top() == 8 and bm.top(cached=False) == 0
    bm.set_limit(3)
    assert bm.num_cached() == 3 and bm.num_free() == 3 and bm.top() == 3


# -- the budget -----------------------------------------------------------------------------


def budget(**kw) -> MemoryBudget:
    """200 blocks of 1000 bytes, or 200 tokens of 1000 bytes of activations, or a mix."""
    act = ActivationModel(per_token=1000, fixed=0)
    return MemoryBudget(200_000, 1000, 0, act, min_tokens=8, max_tokens=128, **kw)


def test_budget_shrinks_for_a_held_back_prefill_and_grows_back_with_hysteresis() -> None:
    b = budget(shrink_after_steps=2, grow_after_steps=3)
    assert b.max_blocks == 192 and b.tokens_for(192) == 8 and b.min_prefill_tokens == 32
    b.plan(top=100, decode_tokens=4, prefill_tokens=500, need_blocks=10)
    assert b.cap == 192  # held back once: not yet
    tokens = b.plan(top=100, decode_tokens=4, prefill_tokens=500, need_blocks=10)
    # Its whole chunk (128) would need the cap at 68, under the 100 live blocks: the cap
    # comes down to them (no victim), which leaves the prefill 96 tokens (>= 32).
    assert b.cap == 100 and b.shrinks == 1 and tokens == 100
    b.plan(top=100, decode_tokens=4, prefill_tokens=20, need_blocks=2)
    assert b.cap == 100 and b.grows == 0  # calm, not long enough
    for _ in range(2):
        b.plan(top=50, decode_tokens=4, prefill_tokens=0, need_blocks=0)
    assert b.cap == 192 and b.grows == 1  # nothing waits: all the KV back

    b = budget(shrink_after_steps=1)
    b.plan(top=180, decode_tokens=4, prefill_tokens=500, need_blocks=10)
    # 180 live blocks would leave it 16 < 32 tokens: the cap goes to what leaves it 32 (the
    # live blocks above it are moved down or leave).
    assert b.cap == 200 - 4 - 32 and b.tokens_for(max(b.cap, 180)) == 20
    b = budget(shrink_after_steps=1)
    b.plan(top=20, decode_tokens=4, prefill_tokens=500, need_blocks=10)
    assert b.cap == 200 - 4 - 128  # its whole chunk fits beside the live blocks


def test_budget_flips_are_bounded_per_window() -> None:
    b = budget(shrink_after_steps=1, grow_after_steps=1, window_steps=1000, max_flips=3)
    for _ in range(50):  # a prefill that comes and goes every step
        b.plan(top=150, decode_tokens=4, prefill_tokens=500, need_blocks=10)
        b.plan(top=150, decode_tokens=4, prefill_tokens=0, need_blocks=0)
    assert b.flips_in_window() == 3 and b.shrinks + b.grows == 4


def test_too_small_a_budget_is_one_clear_error(tiny) -> None:
    with pytest.raises(ConfigError, match="memory_budget_bytes 1000 is too small"):
        make(tiny, memory_budget_bytes=1000)


# -- the virtual host storage ---------------------------------------------------------------


def test_virtual_storage_commits_on_write_and_gives_memory_back() -> None:
    shape = (2048, 2, 16, 1, 64)  # 8 KiB per block and layer: 16 MiB per layer
    store = HostVirtualStorage(2, shape, torch.float32)
    before = rss_bytes()
    assert rss_bytes() - before < 1 << 20  # reserved, not backed
    for t in store.tensors:
        t[:1024].fill_(1.0)
    store.commit(1024)
    written = rss_bytes() - before
    assert written >= 0.95 * (2 * 1024 * 8192)
    store.discard(256)
    freed = written - (rss_bytes() - before)
    assert freed >= 0.9 * 2 * 768 * 8192
    assert float(store.tensors[0][300].abs().sum()) == 0.0  # given back: reads zeros
    assert float(store.tensors[1][255].sum()) == 16 * 64 * 2  # below: untouched
    assert store.mapped_bytes() == 2 * 256 * 8192


# -- the engine -----------------------------------------------------------------------------


def burst(eng: Engine, n: int, length: int, max_tokens: int) -> None:
    for i in range(n):
        eng.add_request(f"r{i}", prompt(length + 13 * i, start=i), sampling(i, max_tokens))


def test_same_tokens_with_the_elastic_pool_on_and_off(tiny) -> None:
    """Greedy and seeded requests, a burst that makes the pool shrink (victims swapped to the
    host tier, blocks moved down) and grow back: the same tokens as a fixed pool."""
    off = make(tiny)
    burst(off, 12, 100, 24)
    want = drain(off)
    for offload in ("swap", "off"):
        on = make(tiny, memory_budget_bytes=6 << 20, kv_offload=offload, host_kv_bytes=HOST)
        burst(on, 12, 100, 24)
        assert drain(on, check_budget) == want
        el = on.elastic
        assert el is not None and el.budget.shrinks > 0 and el.budget.grows > 0
        assert el.victims_total + el.blocks_moved_total > 0
        on.close()
    off.close()


def test_the_pool_stats_follow_a_burst_under_a_budget(tiny) -> None:
    """EngineStats carries the cap, the mapped bytes and the counters: the cap shrinks below
    its maximum and grows back, blocks move or victims leave, the memory goes back at idle."""
    eng = make(tiny, memory_budget_bytes=6 << 20, kv_offload="swap", host_kv_bytes=HOST)
    el = eng.elastic
    assert el is not None
    first = eng.stats()
    assert first.kv_pool_cap_blocks == el.budget.max_blocks and first.kv_pool_mapped_bytes == 0
    burst(eng, 12, 100, 24)
    caps, mapped = set(), 0
    while eng.has_unfinished():
        eng.step()
        s = eng.stats()
        caps.add(s.kv_pool_cap_blocks)
        mapped = max(mapped, s.kv_pool_mapped_bytes)
    assert min(caps) < el.budget.max_blocks and max(caps) == el.budget.max_blocks
    assert 0 < mapped <= el.budget.max_blocks * el.budget.block_bytes
    eng.step()  # idle: the pool trims
    s = eng.stats()
    assert s.kv_pool_mapped_bytes == 0 and s.kv_pool_trims_total == el.trims_total > 0
    assert s.kv_pool_resizes_total == {"shrink": el.budget.shrinks, "grow": el.budget.grows}
    assert s.kv_pool_resizes_total["shrink"] > 0 and s.kv_pool_resizes_total["grow"] > 0
    assert s.kv_pool_blocks_moved_total == el.blocks_moved_total
    assert s.kv_pool_victims_total == el.victims_total
    assert s.kv_pool_blocks_moved_total + s.kv_pool_victims_total > 0
    eng.close()


@pytest.mark.parametrize("pool", ["static", "virtual"])
def test_a_pool_without_a_budget_reports_all_of_it_and_no_resizes(tiny, pool) -> None:
    eng = make(tiny, kv_pool=pool)
    s = eng.stats()
    assert s.kv_pool_cap_blocks == s.num_total_blocks == eng.blocks.num_blocks
    assert s.kv_pool_mapped_bytes == eng.kv.nbytes > 0
    assert s.kv_pool_resizes_total == {"shrink": 0, "grow": 0}
    assert s.kv_pool_blocks_moved_total == s.kv_pool_victims_total == s.kv_pool_trims_total == 0
    eng.sleep()
    assert eng.stats().kv_pool_mapped_bytes == 0  # given back
    eng.wake()
    eng.close()


def test_rss_falls_by_the_kv_bytes_freed_after_a_burst_drains(tiny) -> None:
    eng = make(tiny, memory_budget_bytes=64 << 20, max_num_seqs=64)
    storage = eng.kv.storage
    assert storage is not None
    burst(eng, 20, 480, 2)
    while eng.has_unfinished():
        eng.step()
    gc.collect()
    held = storage.mapped_bytes()
    assert held >= 8 << 20  # the burst's KV is still held (and written)
    before = rss_bytes()
    eng.step()  # idle: the pool trims
    after = rss_bytes()
    freed = held - storage.mapped_bytes()
    assert freed == held  # nothing live: all of it goes back
    print(f"rss fell {before - after} bytes, kv freed {freed} bytes")
    assert before - after >= 0.9 * freed, (before - after, freed)
    eng.close()


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    budget_kib=st.integers(2600, 6000),
    offload=st.sampled_from(["off", "swap", "layerwise"]),
)
def test_the_budget_holds_every_step_under_random_arrivals(tiny, seed, budget_kib, offload):
    eng = make(
        tiny,
        memory_budget_bytes=budget_kib << 10,
        kv_offload=offload,
        host_kv_bytes=HOST,
        max_num_seqs=16,
        max_model_len=512,
    )
    rng = random.Random(seed)
    arrivals = sorted((rng.randrange(60), i) for i in range(rng.randrange(4, 14)))
    step = 0
    done: set[str] = set()
    while arrivals or eng.has_unfinished():
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            length = rng.choice([8, 40, 150, 300])
            eng.add_request(f"q{i}", prompt(length, start=i), sampling(i, rng.randrange(1, 40)))
        for o in eng.step():
            if o.finish_reason is not None:
                done.add(o.request_id)
        if eng.elastic is not None and eng.elastic.last is not None:
            check_budget(eng)
        step += 1
        assert step < 5000
    eng.close()


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_the_activation_estimate_bounds_a_measured_prefill_peak(tiny) -> None:
    """A fresh 1,500-token prefill: the process's peak RSS rises by no more than the
    estimate of the step's activations (the KV it writes is counted apart: a static pool,
    already written)."""
    eng = make(tiny, num_kv_blocks=128, max_num_batched_tokens=2048, max_model_len=2048)
    eng.add_request("w", prompt(16), sampling(0, 2))
    drain(eng)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the RSS now
    before = rss_bytes()
    eng.add_request("a", prompt(1500), sampling(0, 1))
    eng.step()
    rise = peak_rss_bytes() - before
    from mell.workerd.engine.memory_budget import activation_model

    estimate = activation_model(eng.model_config, eng.dtype).peak(1500)
    print(f"1500-token prefill: peak RSS rose {rise} bytes, estimate {estimate}")
    assert rise <= estimate
    eng.close()


def test_blocks_that_move_count_as_a_preemption_for_a_migration(tiny) -> None:
    """Compaction rewrites block tables: a request whose held blocks changed ids shows a new
    num_preemptions (a migration copying its blocks from views of the cache aborts)."""
    eng = make(tiny, memory_budget_bytes=6 << 20, kv_offload="swap", host_kv_bytes=HOST)
    burst(eng, 12, 100, 24)
    seen: dict[str, tuple[list[int], int, bool]] = {}
    moved = 0
    while eng.has_unfinished():
        eng.step()
        for i in range(12):
            rid, state = f"r{i}", eng.request_state(f"r{i}")
            table = eng.block_table(rid, 0)
            if state is None or table is None:
                seen.pop(rid, None)
                continue
            if rid in seen and seen[rid][2] == state.kv_on_host:  # (same tier's table)
                old, preemptions, _ = seen[rid]
                kept = table[: len(old)]
                if kept != old[: len(kept)]:
                    moved += 1
                    assert state.num_preemptions != preemptions
            seen[rid] = (list(table), state.num_preemptions, state.kv_on_host)
    assert eng.elastic is not None and eng.elastic.blocks_moved_total > 0 and moved > 0
    eng.close()


def test_worker_flags_set_the_budget_and_the_pool() -> None:
    from mell.workerd.main import build_parser, make_config

    argv = ["--memory-budget-bytes", "123456789", "--kv-pool", "virtual"]
    engine = make_config(build_parser().parse_args(argv)).engine
    assert engine.memory_budget_bytes == 123456789 and engine.kv_pool == "virtual"
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        make_config(build_parser().parse_args(["--memory-budget-bytes", "-1"]))
