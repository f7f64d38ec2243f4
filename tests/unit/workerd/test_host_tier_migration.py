"""Live migration of requests whose KV is on the host tier (LayerKV), between real engines on
mell-tiny: a swapped-out or parked request moves with its KV read from the source's host
memory; a destination short of device blocks receives it into host blocks (it arrives parked).
Tokens equal a run without migration; a migration aborted mid-stage leaks no block of either
tier on either side."""

from __future__ import annotations

import pytest
from migration_world import World
from tier_checks import assert_invariants, assert_no_leaks

from mell.common.config import EngineConfig
from mell.common.messages import MigrateBlocks
from mell.common.sampling import SamplingParams
from mell.common.slo import RequestSLO
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine
from mell.workerd.engine.sequence import SequenceStatus
from mell.workerd.migration.settings import MigrationSettings

HOST = 1 << 22
SLO = RequestSLO(ttft_s=30.0, tpot_s=10.0)  # its own SLOs travel with it (never binding here)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def engine(tiny, **kw) -> Engine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("num_kv_blocks", 96)
    kw.setdefault("block_size", 4)
    return Engine(EngineConfig(model=str(tiny), **kw))


def prompt(n: int, start: int) -> list[int]:
    return [(start + 7 * i) % 500 + 3 for i in range(n)]


def sampling(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(max_tokens=24, temperature=0.9, seed=40 + i, ignore_eos=True)
    return SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


SOURCE = {f"r{i}": (prompt(30 + 9 * i, i), sampling(i)) for i in range(4)}
LOCAL = {f"b{i}": (prompt(50, 20 + i), sampling(i)) for i in range(2)}  # the destination's own

SOURCES = {
    # a pool of 24 blocks of 4 for four requests of 54-75 tokens: preemptions swap
    "swapped": {"num_kv_blocks": 24, "kv_offload": "swap", "host_kv_bytes": HOST},
    # every prompt prefilled straight to the host and parked
    "parked": {
        "num_kv_blocks": 48,
        "kv_offload": "layerwise",
        "host_kv_bytes": HOST,
        "kv_offload_force": True,
    },
}
DESTINATIONS = {
    "device": {},
    # 32 blocks, 26 taken at once by its own two prompts (whole-prompt admission): a migrated
    # request's KV (8 blocks or more) does not fit on the device and is received into host
    # blocks
    "host": {"num_kv_blocks": 32, "kv_offload": "swap", "host_kv_bytes": HOST},
}


def reference(tiny) -> dict[str, list[int]]:
    eng = engine(tiny)
    for rid, (p, s) in (SOURCE | LOCAL).items():
        eng.add_request(rid, p, s)
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def world(tiny, source: str, destination: str, **settings) -> World:
    w = World(
        {"a": engine(tiny, **SOURCES[source]), "b": engine(tiny, **DESTINATIONS[destination])},
        MigrationSettings(**settings),
    )
    for rid, (p, s) in SOURCE.items():
        w.add("a", rid, p, s, SLO)
    for rid, (p, s) in LOCAL.items():
        w.add("b", rid, p, s)
    return w


def hosted(eng: Engine) -> list[str]:
    return [rid for rid, seq in eng._seqs.items() if seq.status is SequenceStatus.HOSTED]


def received_on_host(eng: Engine) -> bool:
    return eng.tier is not None and any(
        key.startswith("migrate-in:") for key in eng.tier.blocks.requests()
    )


@pytest.mark.parametrize("destination", list(DESTINATIONS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_hosted_requests_migrate_with_their_kv(tiny, source, destination) -> None:
    want = reference(tiny)
    w = world(tiny, source, destination)
    a, b = w.nodes["a"].engine, w.nodes["b"].engine
    moved: set[str] = set()
    into_host = slo_seen = False
    for _ in range(3000):
        if not any(n.engine.has_unfinished() or n.hub.busy for n in w.nodes.values()):
            break
        w.step()
        into_host |= received_on_host(b)
        arrived = [rid for rid in moved if rid in b._seqs]
        assert all(b._seqs[rid].slo == SLO for rid in arrived)
        slo_seen |= bool(arrived)
        for rid in hosted(a):
            if rid not in moved and not w.nodes["a"].hub.migrating(rid):
                state = a.request_state(rid)
                assert state is not None and state.kv_on_host
                assert w.migrate(rid, "a", "b", "kv") is None
                moved.add(rid)
        for eng in (a, b):
            assert_invariants(eng)
    w.run()
    assert dict(w.tokens) == want
    ends = w.ended("a")
    assert moved and len(ends) == len(moved)
    assert all(e.committed and e.copy_bytes > 0 for e in ends), ends  # KV went, not tokens
    assert a.stats().offload_bytes_total["d2h"] > 0
    assert into_host == (destination == "host") and slo_seen
    for eng in (a, b):
        assert_no_leaks(eng)
        eng.close()


def _hosted_migration_started(tiny, destination: str) -> tuple[World, str]:
    """A parked request on "a" whose KV migration to "b" has just been started."""
    w = world(tiny, "parked", destination, step_timeout_s=0.3)
    w.step()
    a = w.nodes["a"].engine
    rid = hosted(a)[0]
    assert w.migrate(rid, "a", "b", "kv") is None
    assert a._seqs[rid].status is SequenceStatus.PAUSED  # one stage: paused at once
    return w, rid


def _truncate(message, frames):  # a KV frame one byte short: the stage's count will not match
    return [*frames[:-1], frames[-1][:-1]] if isinstance(message, MigrateBlocks) else frames


@pytest.mark.parametrize("destination", list(DESTINATIONS))
@pytest.mark.parametrize("how", ["destination killed", "frame lost", "request aborted"])
def test_a_hosted_migration_aborted_mid_stage_leaks_nothing(tiny, destination, how) -> None:
    want = reference(tiny)
    w, rid = _hosted_migration_started(tiny, destination)
    a, b = w.nodes["a"].engine, w.nodes["b"].engine
    w.deliver()  # the destination reserves
    assert received_on_host(b) == (destination == "host")
    if how == "destination killed":
        w.deliver()  # the source sends the stage's blocks, read from its host tier
        w.nodes["b"].alive = False
    elif how == "frame lost":
        w.mangle = _truncate
    else:
        w.deliver()
        assert a.abort(rid)  # the client went away, its host blocks read mid-stage
    w.run()
    [end] = w.ended("a")
    assert not end.committed
    if how == "destination killed":
        w.nodes["b"].alive = True
        w.nodes["b"].hub.poll(now=1e12)  # its reservation expires (the source is silent)
        w.run()
    for r, tokens in want.items():
        if r != rid or how != "request aborted":
            assert w.tokens[r] == tokens, r
    for eng in (a, b):
        assert_no_leaks(eng)
        eng.close()
