"""Sleep and wake (`ServingEngine.sleep` / `wake`) on mell-tiny: the KV memory really leaves
the process (its resident set, /proc/self/statm) and comes back; what sleep refuses; the prefix
cache emptied; a request given to a sleeping engine wakes it and runs as if it never slept."""

from __future__ import annotations

import os

import pytest

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.contract import EngineBusy
from mell.workerd.engine.engine import Engine

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
KV_BYTES = 192 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def make(tiny, **kw) -> Engine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kv_cache_memory_bytes", KV_BYTES)
    return Engine(EngineConfig(model=str(tiny), **kw))


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(eng: Engine, request_id: str, prompt: list[int]) -> list[int]:
    eng.add_request(request_id, prompt, GREEDY)
    tokens: list[int] = []
    while eng.has_unfinished():
        for out in eng.step():
            tokens += out.new_token_ids
    return tokens


PROMPT = [(5 + 7 * i) % 300 + 3 for i in range(40)]


def test_sleep_gives_the_kv_memory_back_and_wake_takes_it_again(tiny) -> None:
    eng = make(tiny)
    before = run(eng, "a", PROMPT)
    kv_bytes = eng.kv.nbytes
    assert kv_bytes >= KV_BYTES - eng.kv.block_bytes * eng.kv.num_layers
    awake = rss_bytes()
    assert eng.sleep() == kv_bytes
    asleep = rss_bytes()
    assert eng.sleeping and eng.stats().sleeping
    assert eng.stats().kv_bytes_released == kv_bytes
    assert awake - asleep >= 0.9 * kv_bytes, (awake, asleep, kv_bytes)
    assert eng.sleep() == 0  # already asleep
    assert eng.wake() == kv_bytes
    assert rss_bytes() - asleep >= 0.9 * kv_bytes  # zeroed: every page touched again
    assert not eng.sleeping and eng.stats().kv_bytes_released == 0
    assert eng.wake() == 0
    assert run(eng, "b", PROMPT) == before


def test_a_request_wakes_a_sleeping_engine_and_runs_as_before(tiny) -> None:
    eng = make(tiny, kv_cache_memory_bytes=8 << 20)
    before = run(eng, "a", PROMPT)
    eng.sleep()
    assert run(eng, "b", PROMPT) == before
    assert not eng.sleeping


def test_sleep_refuses_while_requests_or_blocks_are_held(tiny) -> None:
    eng = make(tiny, kv_cache_memory_bytes=8 << 20)
    eng.add_request("q", PROMPT, GREEDY)
    with pytest.raises(EngineBusy, match="1 queued requests"):
        eng.sleep()
    eng.step()
    with pytest.raises(EngineBusy, match="1 running requests"):
        eng.sleep()
    assert eng.pause("q")
    with pytest.raises(EngineBusy, match="1 paused requests"):
        eng.sleep()
    assert not eng.sleeping
    eng.abort("q")
    assert eng.reserve("migration-in", 2)
    with pytest.raises(EngineBusy, match="1 block reservations"):
        eng.sleep()
    eng.release("migration-in")
    assert eng.sleep() > 0


def test_sleep_empties_the_prefix_cache(tiny) -> None:
    eng = make(tiny, kv_cache_memory_bytes=8 << 20, enable_prefix_caching=True)
    first = run(eng, "a", PROMPT)
    used, free = eng.stats().cached_hashes
    assert free and not used  # the finished prompt's blocks: cached, nobody holds them
    free_before = eng.stats().num_free_blocks
    eng.sleep()
    assert eng.stats().cached_hashes == ([], [])
    assert eng.stats().num_free_blocks == free_before
    assert eng.blocks.num_cached() == 0
    # After waking, the same prompt is computed from scratch (no stale hash hits a zeroed block)
    eng.add_request("b", PROMPT, GREEDY)
    tokens = []
    while eng.has_unfinished():
        for out in eng.step():
            tokens += out.new_token_ids
            assert out.num_cached_tokens == 0
    assert tokens == first


def test_a_migration_reserving_blocks_wakes_a_sleeping_engine(tiny) -> None:
    eng = make(tiny, kv_cache_memory_bytes=8 << 20)
    eng.sleep()
    assert eng.reserve("migration-in", 2)
    assert not eng.sleeping and len(eng.kv.tensors) == eng.kv.num_layers
    [(n, frame)] = eng.read_kv("migration-in", 0, eng.block_table("migration-in", 0))
    assert n == 2 and len(frame) == 2 * eng.kv.block_bytes
