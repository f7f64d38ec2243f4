"""The host KV tier (LayerKV) on CPU: fenced block accounting, the copy engine, and the engine
with kv_offload "swap" and "layerwise" on mell-tiny (token identity, no leaks, aborts
mid-copy, swap storms, parked requests decode, a hosted request paused for migration,
attention plans that never see host blocks)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tier_checks import assert_invariants, assert_no_leaks

from mell.common.config import EngineConfig
from mell.common.errors import ConfigError
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.copy_engine import D2H, H2D, Rows, ThreadCopyEngine
from mell.workerd.engine.engine import Engine
from mell.workerd.engine.sequence import SequenceStatus

HOST = 1 << 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def prompt(n: int, start: int = 5) -> list[int]:
    return [(start + 7 * i) % 500 + 3 for i in range(n)]


def sampling(i: int, max_tokens: int = 16) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=100 + i, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def make(tiny, **kw) -> Engine:
    kw.setdefault("max_model_len", 512)
    return Engine(EngineConfig(model=str(tiny), **kw))


def drain(eng: Engine, tokens: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Step until idle (at most two minutes); every request's tokens, checked for gaps."""
    tokens = {} if tokens is None else tokens
    deadline = time.monotonic() + 120.0
    while eng.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not drain"
        collect(eng.step(), tokens)
        assert_invariants(eng)
    return tokens


def collect(outputs, tokens: dict[str, list[int]]) -> None:
    for out in outputs:
        got = tokens.setdefault(out.request_id, [])
        assert out.first_index == len(got)
        got += out.new_token_ids


def workload(eng: Engine, n: int = 10) -> None:
    for i in range(n):
        eng.add_request(f"r{i}", prompt(20 + 37 * i, i), sampling(i, max_tokens=48))


# -- block accounting ---------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "grow", "free", "fence", "unfence", "fork"]),
        st.integers(0, 7),
        st.integers(1, 80),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_fenced_blocks_are_accounted_per_layer(ops) -> None:
    bm = BlockManager(24, 8, 3)
    fenced: list[list[list[int]]] = []
    for op, who, n in ops:
        rid = f"q{who}"
        try:
            if op == "alloc" and not bm.has(rid):
                bm.allocate(rid, n)
            elif op == "grow" and bm.has(rid):
                bm.append(rid, n, layers=[who % 3] if n % 2 else None)
            elif op == "free":
                bm.free(rid)
            elif op == "fence":
                fenced.append(bm.fence(rid))
            elif op == "unfence" and fenced:
                for layer, ids in enumerate(fenced.pop(n % len(fenced))):
                    bm.unfence(layer, ids)
            elif op == "fork" and bm.has(rid) and not bm.has(rid + "f"):
                bm.fork(rid, rid + "f")
        except Exception as err:  # only running out of blocks is expected
            assert type(err).__name__ == "OutOfBlocks"
        for layer in range(3):
            total = bm.num_free(layer) + bm.num_used(layer) + bm.num_fenced(layer)
            assert total == 24
    for rid in bm.requests():
        bm.free(rid)
    for tables in fenced:
        for layer, ids in enumerate(tables):
            bm.unfence(layer, ids)
    assert all(bm.num_free(layer) == 24 for layer in range(3))


# -- the copy engine ----------------------------------------------------------------------------


def test_copies_round_trip_whole_runs_and_staged_rows() -> None:
    torch.manual_seed(0)
    device = torch.randn(10, 2, 4, 2, 3)
    host = torch.zeros(6, 2, 4, 2, 3)
    back = torch.zeros(10, 2, 4, 2, 3)
    copies = ThreadCopyEngine()
    out = copies.copy(device, [7, 2, 3, 9], host, [1, 2, 3, 5], D2H)
    copies.copy(host, [1, 2, 3, 5], back, [0, 4, 5, 6], H2D, after=out).wait()
    assert torch.equal(back[[0, 4, 5, 6]], device[[7, 2, 3, 9]])
    k, v = torch.randn(11, 2, 3), torch.randn(11, 2, 3)  # 11 rows: 2 whole blocks + 3
    copies.copy(Rows(k, v), [], host, [0, 4, 5], D2H).wait()
    assert torch.equal(host[[0, 4]][:, 0].reshape(8, 2, 3), k[:8])
    assert torch.equal(host[5, 0, :3], k[8:]) and torch.equal(host[5, 1, :3], v[8:])
    assert copies.bytes_moved[D2H] == 4 * host[0].numel() * 4 + 2 * k.numel() * 4
    copies.close()


def test_emulated_link_paces_copies() -> None:
    src, dst = torch.zeros(8, 2, 16, 4, 8), torch.zeros(8, 2, 16, 4, 8)
    nbytes = 8 * src[0].numel() * 4  # 128 KiB
    copies = ThreadCopyEngine(link_bytes_per_s=nbytes / 0.2)
    start = time.monotonic()
    ticket = copies.copy(src, list(range(8)), dst, list(range(8)), D2H)
    assert not ticket.done()  # asynchronous: submit returns at once
    ticket.wait()
    assert time.monotonic() - start >= 0.19
    copies.close()


# -- the engine ---------------------------------------------------------------------------------


def test_offload_configuration_errors(tiny) -> None:
    with pytest.raises(ConfigError, match="host_kv_bytes"):
        make(tiny, kv_offload="swap")
    with pytest.raises(ConfigError, match="host_kv_bytes"):
        make(tiny, kv_offload="layerwise", host_kv_bytes=-1)


@pytest.mark.parametrize(
    ("mode", "force"), [("swap", False), ("swap", True), ("layerwise", False), ("layerwise", True)]
)
def test_tokens_identical_with_the_host_tier(tiny, mode, force) -> None:
    off = make(tiny, num_kv_blocks=32)
    workload(off)
    expected = drain(off)
    eng = make(tiny, num_kv_blocks=32, kv_offload=mode, host_kv_bytes=HOST, kv_offload_force=force)
    workload(eng)
    assert drain(eng) == expected
    stats = eng.stats()
    assert stats.num_swaps_total > 0
    if mode == "layerwise":
        assert stats.num_parked_total >= (10 if force else 1)  # forced: every prompt parks
        assert stats.offload_bytes_total["d2h"] > 0 and stats.offload_bytes_total["h2d"] > 0
    assert_no_leaks(eng)
    eng.close()


def test_a_long_prompt_is_parked_and_decodes(tiny) -> None:
    """A prompt bigger than the free device blocks gets its first token at once (prefilled
    to the host), then decodes once reloaded."""
    eng = make(tiny, num_kv_blocks=24, kv_offload="layerwise", host_kv_bytes=HOST)
    for i in range(4):
        eng.add_request(f"d{i}", prompt(40, i), sampling(0, max_tokens=60))
    tokens: dict[str, list[int]] = {}
    collect(eng.step(), tokens)
    eng.add_request("long", prompt(300, 9), sampling(0, max_tokens=8))
    collect(eng.step(), tokens)
    assert len(tokens["long"]) == 1  # the first token, at once
    assert eng._seqs["long"].status is SequenceStatus.HOSTED
    drain(eng, tokens)
    ref = make(tiny, num_kv_blocks=64)
    ref.add_request("long", prompt(300, 9), sampling(0, max_tokens=8))
    assert tokens["long"] == drain(ref)["long"]
    assert_no_leaks(eng)


def test_aborts_mid_copy_leak_nothing(tiny) -> None:
    """A slow emulated link keeps copies in flight while their requests are aborted."""
    eng = make(
        tiny,
        num_kv_blocks=40,
        kv_offload="layerwise",
        host_kv_bytes=HOST,
        kv_offload_force=True,
        kv_link_bytes_per_s=2e6,
    )
    workload(eng)
    fenced_by_aborts = 0
    for step in range(40):
        eng.step()
        victims = list(eng.scheduler.hosted) + list(eng.scheduler.running)
        if victims and step % 2 == 0:
            before = eng.tier.in_flight()
            assert eng.abort(victims[0].request_id)
            fenced_by_aborts += eng.tier.in_flight() > before  # its copies still in flight
        assert_invariants(eng)
    assert fenced_by_aborts > 0
    for rid in list(eng._seqs):
        eng.abort(rid)
    assert_no_leaks(eng)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.sampled_from(["add", "abort", "step"]), st.integers(0, 9)), max_size=40)
)
def test_swap_storms_leak_nothing(tiny, storm) -> None:
    eng = make(
        tiny, num_kv_blocks=24, kv_offload="swap", host_kv_bytes=1 << 20, kv_offload_force=True
    )
    added = 0
    tokens: dict[str, list[int]] = {}
    for op, i in storm:
        if op == "add":
            eng.add_request(f"s{added}", prompt(10 + 29 * i, i), sampling(i, max_tokens=12))
            added += 1
        elif op == "abort" and added:
            eng.abort(f"s{i % added}")
            tokens.pop(f"s{i % added}", None)
        else:
            collect(eng.step(), tokens)
        assert_invariants(eng)
    drain(eng, tokens)
    assert_no_leaks(eng)
    eng.close()


def test_attention_plans_only_see_device_blocks(tiny) -> None:
    eng = make(
        tiny, num_kv_blocks=40, kv_offload="layerwise", host_kv_bytes=HOST, kv_offload_force=True
    )
    attention = eng.runner.attention
    plan, forward = attention.plan, attention.forward
    seen = {"plans": 0, "staged": 0}

    def checked_plan(batch):
        seen["plans"] += 1
        for table in batch.block_tables:
            if not table:
                seen["staged"] += 1
            for block in table:  # held on the device (in the layer of this plan), not fenced
                assert 0 <= block < eng.blocks.num_blocks
                assert any(eng.blocks.ref_count(layer, block) > 0 for layer in (0, 1))
        return plan(batch)

    def checked_forward(p, q, k, v, kv_cache, layer):
        assert any(kv_cache is t for t in eng.kv.tensors)
        assert not any(kv_cache is t for t in eng.tier.tensors)
        return forward(p, q, k, v, kv_cache, layer)

    attention.plan, attention.forward = checked_plan, checked_forward
    workload(eng)
    drain(eng)
    assert seen["plans"] > 0 and seen["staged"] >= 10


def test_a_hosted_request_paused_keeps_its_host_kv(tiny) -> None:
    """Pausing a request on the host tier (it is about to migrate) keeps its KV there, with
    no preemption; resumed, it waits on the host again and decodes the same tokens."""
    off = make(tiny, num_kv_blocks=64)
    off.add_request("m", prompt(100, 3), sampling(1, max_tokens=12))
    expected = drain(off)["m"]
    eng = make(
        tiny, num_kv_blocks=64, kv_offload="layerwise", host_kv_bytes=HOST, kv_offload_force=True
    )
    eng.add_request("m", prompt(100, 3), sampling(1, max_tokens=12))
    got: dict[str, list[int]] = {}
    collect(eng.step(), got)
    assert eng._seqs["m"].status is SequenceStatus.HOSTED
    before = eng.request_state("m")
    assert before is not None and before.kv_on_host and not before.is_decoding
    table = eng.block_table("m", 0)
    assert eng.pause("m")
    after = eng.request_state("m")
    assert after == before
    assert eng.block_table("m", 0) == table and eng.blocks.requests() == []
    eng.resume("m")
    assert eng._seqs["m"].status is SequenceStatus.HOSTED
    assert drain(eng, got)["m"] == expected
    assert_no_leaks(eng)
