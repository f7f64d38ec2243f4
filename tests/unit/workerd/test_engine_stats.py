"""The engine's stats on mell-tiny travel whole: its `WorkerStats` part is what the load report
carries, and what the gateway decodes; what stays on the worker does not go on the wire."""

from __future__ import annotations

import msgspec
import pytest

from mell.common.config import EngineConfig
from mell.common.messages import LoadReport, WorkerMessage
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.common.workers import RequestLoad, WorkerLoad, WorkerStats
from mell.workerd.engine.engine import Engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def run(eng: Engine, *prompts: list[int]) -> None:
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, GREEDY)
    while eng.has_unfinished():
        eng.step()


def test_the_load_report_carries_the_engines_stats_whole(tiny) -> None:
    eng = Engine(EngineConfig(model=str(tiny), max_model_len=512, enable_prefix_caching=True))
    shared = list(range(3, 67))
    run(eng, [*shared, 9], [*shared, 11])
    eng.add_request("live", shared, GREEDY)
    eng.step()
    stats = eng.stats()
    assert stats.prefix_cache_hits_total > 0 and stats.request_blocks  # (figures worth sending)
    report = LoadReport(load=WorkerLoad.of(stats, [RequestLoad("live", 4, 65)]))
    wire = msgspec.msgpack.encode(report)
    got = msgspec.msgpack.decode(wire, type=WorkerMessage)
    assert isinstance(got, LoadReport)
    assert got.load.figures() == stats.figures()
    assert got.load.requests == [RequestLoad("live", 4, 65)]
    sent = msgspec.msgpack.decode(wire, type=list)[1]  # (array_like: [tag, load, ...])
    assert set(sent) == {*WorkerStats.__struct_fields__, "requests"}


def test_computed_tokens_count_prefill_past_the_cache_and_each_decode(tiny) -> None:
    """Per request: its prompt less the tokens the prefix cache held, and one per token
    sampled after the first (mell:computed_tokens)."""
    eng = Engine(EngineConfig(model=str(tiny), max_model_len=512, enable_prefix_caching=True))
    first, again = list(range(3, 43)), list(range(3, 43))  # 40 tokens; the second hits 32
    run(eng, first)
    assert eng.stats().num_computed_tokens_total == 40 + 7
    run(eng, again, list(range(100, 105)))
    stats = eng.stats()
    assert stats.prefix_cache_hits_total == 32
    assert stats.num_computed_tokens_total == (40 + 40 + 5) - 32 + 3 * 7
